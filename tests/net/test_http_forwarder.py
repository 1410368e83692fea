"""HttpForwarder against a fake forward proxy on loopback: pipelining, 100-continue,
HEAD, early responses, the proxy ending keep-alive, and when to fall back to a tunnel."""

import hashlib
import math
import os
import socket
from functools import partial

import h11
import pytest
import trio

from relay import fastpath
from relay.addresses import format_address
from relay.net import http_forward
from relay.net.http_forward import MAX_INFORMATIONAL, READ_SIZE, ForwardFailed, HttpForwarder, NeedsTunnel, Switched
from relay.net.pump import Pump
from relay.net.sockets import reset, write_all
from tests.net.test_pump import trio_pair
from tests.net.test_server import served
from tests.sockpairs import hard_close, tcp_pair


@pytest.fixture(autouse=True, params=["threshold", "every-byte"])
def splicing(request, impl, monkeypatch):
    """Body bytes go by h11 through the fast path's Conduit: each test runs on both twins, with bodies
    spliced from the usual size on, and with every byte h11 may skip spliced."""
    monkeypatch.setattr(fastpath, "Conduit", impl.Conduit)
    if request.param == "every-byte":
        monkeypatch.setattr(http_forward, "PASS_MIN", 1)
    return request.param


class FakeProxy:
    """An h11 forward proxy that answers by path and records what it was asked."""

    def __init__(self):
        self.requests = []  # (method, target, headers dict, body)
        self.connections = 0
        self.drop_next = False
        self.after_close = b""  # bytes sent to a connection after its "then-close" FIN

    async def serve(self, stream):
        self.connections += 1
        http = h11.Connection(h11.SERVER)

        async def next_event():
            while (event := http.next_event()) is h11.NEED_DATA:
                try:
                    http.receive_data(await stream.receive_some(65536))
                except trio.BrokenResourceError:  # the relay reset it, as it does when the client fails
                    return None
            return event

        async def send(*events):
            for event in events:
                await stream.send_all(http.send(event))

        while True:
            request = await next_event()
            if not isinstance(request, h11.Request):
                return
            path = request.target.split(b"/", 3)[-1].decode()
            headers = dict(request.headers)
            if path == "early":
                await send(
                    h11.Response(status_code=413, headers=[("Content-Length", "0"), ("Connection", "close")]),
                    h11.EndOfMessage(),
                )
                self.requests.append((request.method, request.target, headers, None))
                return
            if headers.get(b"expect") == b"100-continue":
                await send(h11.InformationalResponse(status_code=100, headers=[]))
            body = b""
            while isinstance(event := await next_event(), h11.Data):
                body += event.data
            if event is None:  # reset mid-body
                return
            self.requests.append((request.method, request.target, headers, body))
            reply = hashlib.sha256(body).hexdigest().encode() if body else b"ok " + request.target
            if self.drop_next:  # closed as this request came in: it crossed our close
                self.drop_next = False
                return
            extra = [("Connection", "close")] if path == "close" else []
            await send(
                h11.Response(
                    status_code=200, headers=[("Content-Length", str(1000 if path == "head" else len(reply))), *extra]
                )
            )
            if request.method != b"HEAD":
                await send(h11.Data(data=reply))
            await send(h11.EndOfMessage())
            if http.our_state is h11.MUST_CLOSE:
                return
            if path == "then-close":  # an idle timeout, unannounced: FIN, then note what still comes
                await stream.send_eof()
                while data := await stream.receive_some(65536):
                    self.after_close += data
                return
            if path == "then-drop":
                self.drop_next = True
            http.start_next_cycle()


@pytest.fixture
async def proxy(nursery):
    fake = FakeProxy()
    listeners = await nursery.start(partial(trio.serve_tcp, fake.serve, 0, host="127.0.0.1"))
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


def forwarder_for(proxy, client_side, first=b""):
    async def open_proxy(fresh=False):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", proxy.port))
        return sock, False

    return HttpForwarder(
        client_side,
        first,
        ("10.9.9.9", 8080),
        open_proxy,
        usable_name=lambda name: name,
        proxy_authorization=b"Basic cHJveHk6cGFzcw==",
        idle_timeout=10,
    )


async def responses(sock, methods):
    """Read one response per request method sent (HEAD responses have no body): (status, body) pairs."""
    http, out = h11.Connection(h11.CLIENT), []
    for method in methods:
        http.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))  # only tracks the state
        http.send(h11.EndOfMessage())
        status, body = None, b""
        while not isinstance(event := http.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                http.receive_data(await sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
        out.append((status, body))
        if len(out) < len(methods):
            http.start_next_cycle()
    return out


def get(path, host="mirror.example", method="GET"):
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def test_pipelined_requests_go_in_absolute_form_in_order(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(get("/a") + get("/b", host="other.example:8080") + get("/c", host="10.1.1.1"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["GET"] * 3)
        client.shutdown(trio.socket.SHUT_WR)
    assert [status for status, _ in got] == [200, 200, 200]
    assert [target for _, target, _, _ in proxy.requests] == [
        b"http://mirror.example:8080/a",  # the original port: the name comes from Host, the port from the destination
        b"http://other.example:8080/b",
        b"http://10.9.9.9:8080/c",  # an IP in Host is no name: the original address
    ]
    assert all(headers[b"proxy-authorization"] == b"Basic cHJveHk6cGFzcw==" for _, _, headers, _ in proxy.requests)
    assert proxy.connections == 1 and forwarder.requests == 3


async def test_expect_100_continue_and_streamed_upload(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    body = bytes(range(256)) * 4096
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await client.send(
            (
                f"PUT /up HTTP/1.1\r\nHost: h.example\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        interim = await client.recv(1000)
        assert interim.startswith(b"HTTP/1.1 100 ")  # the body is only sent after this, as a real client does
        view = memoryview(body)
        while view:
            view = view[await client.send(view) :]
        got = await responses(client, ["PUT"])
        client.shutdown(trio.socket.SHUT_WR)
    assert got == [(200, hashlib.sha256(body).hexdigest().encode())]


async def test_head_then_get_on_one_connection(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(get("/head", method="HEAD") + get("/after"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["HEAD", "GET"])
        client.shutdown(trio.socket.SHUT_WR)
    assert got == [(200, b""), (200, b"ok http://mirror.example:8080/after")]


async def test_proxy_ending_keep_alive_means_a_new_proxy_connection(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(get("/close") + get("/next"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["GET", "GET"])
        client.shutdown(trio.socket.SHUT_WR)
    assert [status for status, _ in got] == [200, 200] and proxy.connections == 2


async def test_a_kept_alive_proxy_connection_closed_meanwhile_is_not_reused(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await client.send(get("/then-close"))
        first = await responses(client, ["GET"])
        await trio.sleep(0.1)  # the proxy's FIN arrives while the connection is idle
        await client.send(get("/next"))
        second = await responses(client, ["GET"])
        client.shutdown(trio.socket.SHUT_WR)
    assert first + second == [
        (200, b"ok http://mirror.example:8080/then-close"),
        (200, b"ok http://mirror.example:8080/next"),
    ]
    assert proxy.connections == 2 and forwarder.requests == 2 and proxy.after_close == b""


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE"])
async def test_an_idempotent_request_crossing_the_proxy_close_is_sent_again(proxy, method):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await client.send(get("/then-drop") + get("/again", method=method.decode()) + get("/after"))
        got = await responses(client, ["GET", method, "GET"])
        client.shutdown(trio.socket.SHUT_WR)
    assert [status for status, _ in got] == [200, 200, 200]
    # The second was dropped unanswered, then sent once more on a new connection.
    assert [request[0] for request in proxy.requests] == [b"GET", method, method, b"GET"]
    assert proxy.connections == 2


async def test_a_request_with_a_body_crossing_the_proxy_close_is_not_sent_again(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    body = b"not to be sent twice"
    post = f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    await client.send(get("/then-drop") + post)
    failed = []

    async def run():
        try:
            await forwarder.run()
        except ForwardFailed as exc:
            failed.append(exc.ended)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        assert await responses(client, ["GET"]) == [(200, b"ok http://mirror.example:8080/then-drop")]
    assert failed == ["proxy-closed"] and proxy.connections == 1
    assert [request[0] for request in proxy.requests] == [b"GET", b"POST"]


def sharing_forwarder(proxy, client_side, kept: list):
    """A forwarder whose proxy connections, left idle by a client, serve the next one (as forward() does)."""

    async def open_proxy(fresh=False):
        if kept and not fresh:
            return kept.pop(), True
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", proxy.port))
        return sock, False

    def keep_proxy(sock):
        kept.append(sock)
        return True

    forwarder = forwarder_for(proxy, client_side)
    forwarder.open_proxy, forwarder.keep_proxy = open_proxy, keep_proxy
    return forwarder


async def one_client(forwarder, client, request, methods):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed, forwarder, forwarder.client, ended := [])
        await client.send(request)
        got = await responses(client, methods)
        client.shutdown(trio.socket.SHUT_WR)
    return got, ended


async def test_a_proxy_connection_a_client_left_idle_serves_the_next_client(proxy):
    kept = []
    for path in ("/a", "/b", "/c"):
        client, relay_side = trio_pair()
        got, ended = await one_client(sharing_forwarder(proxy, relay_side, kept), client, get(path), ["GET"])
        assert got == [(200, b"ok http://mirror.example:8080" + path.encode())] and ended == ["closed"]
    assert proxy.connections == 1 and len(kept) == 1


async def test_a_shared_connection_the_proxy_closed_as_the_request_crossed_is_replaced_and_the_request_sent_again(
    proxy,
):
    kept = []
    client, relay_side = trio_pair()
    await one_client(sharing_forwarder(proxy, relay_side, kept), client, get("/then-drop"), ["GET"])
    client, relay_side = trio_pair()
    got, ended = await one_client(sharing_forwarder(proxy, relay_side, kept), client, get("/next"), ["GET"])
    assert got == [(200, b"ok http://mirror.example:8080/next")] and ended == ["closed"]
    # Dropped unanswered on the shared connection, sent once more on a new one (never another shared one).
    assert [request[1] for request in proxy.requests][-2:] == [b"http://mirror.example:8080/next"] * 2
    assert proxy.connections == 2


async def test_a_connection_left_mid_exchange_or_told_to_close_is_never_shared(proxy):
    kept = []
    client, relay_side = trio_pair()
    got, _ = await one_client(sharing_forwarder(proxy, relay_side, kept), client, get("/close"), ["GET"])
    assert got[0][0] == 200 and kept == []


async def test_early_response_ends_the_client_connection(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(b"POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    with trio.fail_after(5):
        assert await forwarder.run() == "closed"
    relay_side.close()
    data = b""
    while chunk := await client.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    "first",
    [
        get("/ws").replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
    ],
)
async def test_first_request_that_absolute_form_cannot_carry_is_tunnelled_as_read(proxy, first):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side, first=first[:10])
    await client.send(first[10:])
    with pytest.raises(NeedsTunnel) as caught:
        with trio.fail_after(5):
            await forwarder.run()
    assert caught.value.data == first and proxy.connections == 0


async def test_upgrade_after_a_forwarded_request_is_refused(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(
        get("/a") + get("/ws").replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    )
    with pytest.raises(ForwardFailed, match="client-upgrade-after-requests"):
        with trio.fail_after(5):
            await forwarder.run()


@pytest.mark.parametrize("empty", [b"\r\n", b"\n", b"\r\n\n" * 20])
async def test_empty_lines_before_and_between_pipelined_requests_are_skipped(proxy, empty):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side, first=empty)  # what the sniffer read
    await client.send(get("/a") + empty + get("/b") + empty)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["GET", "GET"])
        await client.send(empty + get("/c"))  # the empty line and the request in separate reads
        got += await responses(client, ["GET"])
        client.shutdown(trio.socket.SHUT_WR)
    assert [body for _, body in got] == [b"ok http://mirror.example:8080/" + path for path in (b"a", b"b", b"c")]
    assert proxy.connections == 1 and forwarder.requests == 3


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /b HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\r\n" * 101 + get("/b"),  # past the bound of empty lines
        b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a malformed chunk
    ],
    ids=["header", "empty-lines", "chunk"],
)
async def test_a_protocol_error_after_a_good_request_gets_the_whole_answer_then_a_400(proxy, bad):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(get("/a") + bad)  # pipelined: the error is read before the first answer is sent
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_side, ended := [])
            got = await responses(client, ["GET", "GET"])
            answer, how = await rest(client)
            client.shutdown(trio.socket.SHUT_WR)  # the relay reads until then, so as not to reset
    assert got == [(200, b"ok http://mirror.example:8080/a"), (400, b"400 Bad Request\n")]
    assert answer == b"" and how == "end" and ended == ["client-protocol-error"]


# Resets. A socket reports a reset to one call only, and later reads return 0;
# the forwarder must never pass such a 0 on as an end (see the pump tests). Here
# the test plays the proxy by hand, and relayed() ends the client connection as
# Server.forward does.


def forwarder_to(relay_proxy, client_side):
    async def open_proxy(fresh=False):
        return relay_proxy, False

    return HttpForwarder(
        client_side,
        b"",
        ("10.9.9.9", 80),
        open_proxy,
        usable_name=lambda name: name,
        proxy_authorization=None,
        idle_timeout=10,
    )


async def relayed(forwarder, conn, ended: list) -> None:
    try:
        ended.append(await forwarder.run())
        conn.close()
    except ForwardFailed as exc:
        ended.append(exc.ended)
        conn.close() if exc.clean else reset(conn)


async def until(sock, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await sock.recv(65536)
        assert chunk, f"end of data before {marker!r}: {data!r}"
        data += chunk
    return data


async def rest(sock) -> tuple[bytes, str]:
    """The rest of the data from ``sock``, and how it ends: "reset" or "end" (a FIN)."""
    data = b""
    try:
        while chunk := await sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "end"


def complete_response(data: bytes) -> bool:
    """Whether a client would take ``data`` for a complete response."""
    http = h11.Connection(h11.CLIENT)
    http.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "1")]))
    http.receive_data(data)
    try:
        while (event := http.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage):
                return True
    except h11.RemoteProtocolError:
        pass
    return False


RESPONSE_HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\n\r\n",  # to a 1.1 client the relay sends it chunked
}


@pytest.mark.parametrize("framing", RESPONSE_HEADS)
async def test_a_proxy_reset_mid_response_reaches_the_client_as_a_reset(framing):
    # The proxy resets while the request body is still coming. The relay's write
    # of that body to the proxy may take the reset, and the response side then
    # reads 0 from the same socket: for a close-delimited response that 0 is the
    # end of the body, and passing it on would end the chunked response the
    # client sees. Which side runs first is up to Trio, so try it a few times.
    for _ in range(30):
        client, relay_client = trio_pair()
        relay_proxy, proxy = trio_pair()
        forwarder = forwarder_to(relay_proxy, relay_client)
        await client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relayed, forwarder, relay_client, ended := [])
                await until(proxy, b"x")
                await proxy.send(RESPONSE_HEADS[framing] + b"partial")
                seen = await until(client, b"partial")
                # Without a yield in between: more body to read, and the reset.
                os.write(client.fileno(), b"y" * 1000)
                hard_close(proxy)
                more, how = await rest(client)
        assert not complete_response(seen + more), seen + more
        assert how == "reset" and ended == ["upstream-reset"]
        client.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_response_cut_short_reaches_the_client_as_a_reset(framing):
    # The proxy ends the connection before the body is complete: the client must
    # get a reset, not an end that could make the truncated body look complete.
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    await client.send(get("/file"))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"\r\n\r\n")
            await proxy.send(RESPONSE_HEADS[framing] + b"partial")
            proxy.close()
            seen, how = await rest(client)
    assert b"partial" in seen and not complete_response(seen)
    assert how == "reset" and ended == ["proxy-protocol-error"]
    client.close()


@pytest.mark.parametrize("answering", [False, True])
async def test_a_client_reset_mid_request_body_reaches_the_proxy_as_a_reset(answering):
    # The client resets while sending its body (with the proxy's answer already
    # streaming back, or not yet): the proxy must see a reset, as a pumped
    # connection would, not an end of data.
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    await client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"x")
            if answering:
                await proxy.send(RESPONSE_HEADS["content-length"] + b"partial")
                await until(client, b"partial")
            hard_close(client)
            _, how = await rest(proxy)
    assert how == "reset" and ended == ["client-reset"]
    proxy.close()


# Framing a client chose to name in its Connection header.


@pytest.mark.parametrize(
    "head,body",
    [
        ("Connection: content-length\r\nContent-Length: 5", b"hello"),
        ("Connection: keep-alive, Content-Length\r\nContent-Length: 5", b"hello"),
        ("Connection: transfer-encoding\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
    ],
)
async def test_a_body_framed_by_a_header_that_connection_names_arrives_whole(proxy, head, body):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    await client.send(f"POST /up HTTP/1.1\r\nHost: h\r\n{head}\r\n\r\n".encode() + body)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["POST"])
        client.shutdown(trio.socket.SHUT_WR)
    assert got == [(200, hashlib.sha256(b"hello").hexdigest().encode())]
    assert [request[3] for request in proxy.requests] == [b"hello"]


async def test_content_length_next_to_chunked_is_not_forwarded(proxy):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    await client.send(head + b"5\r\nhello\r\n0\r\n\r\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        got = await responses(client, ["POST"])
        client.shutdown(trio.socket.SHUT_WR)
    assert got == [(200, hashlib.sha256(b"hello").hexdigest().encode())]
    [(_, _, headers, body)] = proxy.requests
    assert b"content-length" not in headers and headers[b"transfer-encoding"] == b"chunked" and body == b"hello"


# A proxy the test plays by hand, one connection after another.


def forwarder_to_played(client_side, idle_timeout=10, forward_upgrades=False):
    """A forwarder, and a channel that hands the test the proxy's end of each connection it opens."""
    opened, accepted = trio.open_memory_channel(math.inf)

    async def open_proxy(fresh=False):
        relay_end, proxy_end = trio_pair()
        opened.send_nowait(proxy_end)
        return relay_end, False

    forwarder = HttpForwarder(
        client_side,
        b"",
        ("10.9.9.9", 80),
        open_proxy,
        usable_name=lambda name: name,
        proxy_authorization=None,
        idle_timeout=idle_timeout,
        forward_upgrades=forward_upgrades,
    )
    return forwarder, accepted


async def request_reaching_proxy(client, accepted, request: bytes):
    """The client sends ``request``: the proxy's end of the connection it came on, the request read."""
    await client.send(request)
    proxy = await accepted.receive()
    await until(proxy, b"\r\n\r\n")
    return proxy


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_unrequested_bytes_after_a_response_never_answer_the_next_request():
    # A second complete response right behind the first, in one segment: it lands in h11's buffer,
    # where a peek at the socket does not see it.
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client)

    async def second_connection():
        proxy = await accepted.receive()
        await until(proxy, b"\r\n\r\n")
        await proxy.send(ok(b"asked for"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            first = await request_reaching_proxy(client, accepted, get("/a"))
            await first.send(ok(b"first") + ok(b"unrequested"))
            assert await responses(client, ["GET"]) == [(200, b"first")]
            nursery.start_soon(second_connection)
            await client.send(get("/b"))
            assert await responses(client, ["GET"]) == [(200, b"asked for")]
            client.shutdown(trio.socket.SHUT_WR)
    assert ended == ["closed"] and forwarder.requests == 2


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


async def test_interim_responses_are_bounded_per_exchange():
    # A proxy sending 100 Continue without end kept the relay busy until a timeout; this one
    # stops after a thousand and then answers.
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client)

    async def flood(proxy):
        try:
            for _ in range(100):
                await proxy.send(INTERIM * 10)
            await proxy.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        except OSError:
            pass  # the relay gave up on it

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            nursery.start_soon(flood, await request_reaching_proxy(client, accepted, get("/")))
            seen = b""
            try:
                while b" 204 " not in seen and (chunk := await client.recv(65536)):
                    seen += chunk
            except ConnectionResetError:
                pass
            client.close()
    assert seen.count(b" 100 ") <= MAX_INFORMATIONAL and b" 204 " not in seen
    assert ended == ["proxy-protocol-error"]


@pytest.mark.parametrize("leaves", ["fin", "reset"])
@pytest.mark.parametrize("answering", [False, True])
async def test_a_client_leaving_while_its_response_is_awaited_ends_the_exchange_at_once(leaves, answering):
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client, idle_timeout=3600)
    with trio.fail_after(5):  # the proxy stops sending: only the client's leaving ends it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            proxy = await request_reaching_proxy(client, accepted, get("/slow"))
            if answering:
                await proxy.send(RESPONSE_HEADS["content-length"] + b"partial")
                await until(client, b"partial")
            if leaves == "fin":
                client.shutdown(trio.socket.SHUT_WR)
            else:
                hard_close(client)
            _, how = await rest(proxy)
    assert how == "reset"  # squid drops the request it was working on, as for a client of its own
    assert ended == ["client-closed-mid-request" if leaves == "fin" else "client-reset"]


async def test_pipelined_requests_are_not_taken_for_a_client_leaving():
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            proxy = await request_reaching_proxy(client, accepted, get("/a"))
            await client.send(get("/b"))  # while the relay waits for the answer to /a
            await proxy.send(ok(b"a"))
            await until(proxy, b"/b HTTP/1.1\r\n")
            await proxy.send(ok(b"b"))
            assert await responses(client, ["GET", "GET"]) == [(200, b"a"), (200, b"b")]
            client.shutdown(trio.socket.SHUT_WR)
    assert ended == ["closed"]


async def test_an_http_10_client_gets_neither_interim_responses_nor_trailers():
    # RFC 9110 15.2: no 1xx to an HTTP/1.0 client. Nor trailers: its response is delimited by the
    # close, and h11 raised on them (an internal error, with its traceback).
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            proxy = await request_reaching_proxy(client, accepted, b"GET /old HTTP/1.0\r\n\r\n")
            await proxy.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            await proxy.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
            )
            seen, how = await rest(client)
    assert seen.startswith(b"HTTP/1.1 200 ") and seen.endswith(b"\r\n\r\nhello") and how == "end"
    assert ended == ["closed"]


# Through a whole connection: what a client's protocol error costs the log.


async def test_a_client_protocol_error_costs_one_rate_limited_warning_and_never_a_traceback(proxy, caplog):
    server = served(f"http://127.0.0.1:{proxy.port}")
    await server.pool.resolve()
    malformed = get("/a") + b"GET /b HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n"  # the first falls back to a tunnel
    naming_its_length = b"POST /up HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
    seen, peers = [], []
    async with trio.open_nursery() as server.connections.tasks:
        for sent in (malformed, malformed, naming_its_length):
            client, conn = tcp_pair()
            peers.append(format_address(client.getsockname()))
            client.sendall(sent)
            await server.connections.slots.acquire()  # as accept_loop does
            server.connections.accepted(conn, client.getsockname())
            with trio.socket.from_stdlib_socket(client) as client:
                if sent == malformed:  # its first request answered, then a 400 and a FIN (no reset)
                    got = await responses(client, ["GET", "GET"])
                else:
                    got = await responses(client, ["POST"])
                    client.shutdown(trio.socket.SHUT_WR)
                seen.append(([status for status, _ in got], (await rest(client))[1]))
    assert seen == [([200, 400], "end"), ([200, 400], "end"), ([200], "end")]
    assert "internal error" not in caplog.text
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"connection from {peers[0]}: malformed HTTP request, refused (client-protocol-error)"]


WEBSOCKET = b"GET /ws HTTP/1.1\r\nHost: h.example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"


async def test_a_forwarded_upgrade_becomes_a_tunnel_both_ways_after_the_101_and_only_then(impl):
    """After the 101 the forwarder hands the proxy's socket and the bytes read past it over (Switched),
    and the connection gives both sockets to the pump, as a tunnel's (relay.net.connection)."""
    client, relay_client = trio_pair()
    forwarder, accepted = forwarder_to_played(relay_client, forward_upgrades=True)
    ended = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pump = Pump(lambda *result: ended.append(result), impl=impl)
            nursery.start_soon(pump.run)

            async def forward_then_pump():
                with pytest.raises(Switched) as switched:
                    await forwarder.run()
                pump.add(
                    relay_client,
                    switched.value.proxy,
                    "ws",
                    idle_timeout=10,
                    half_closed_timeout=10,
                    to_upstream_first=switched.value.to_proxy,
                    to_client_first=switched.value.to_client,
                )

            nursery.start_soon(forward_then_pump)
            proxy = await request_reaching_proxy(client, accepted, WEBSOCKET)
            await proxy.send(ok(b"no upgrade here"))  # stock squid drops the offer: the server answers GET
            assert await responses(client, ["GET"]) == [(200, b"no upgrade here")]
            await client.send(WEBSOCKET + b"early frame")  # a client may send before the 101
            request = await until(proxy, b"\r\n\r\n")
            head = request.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
            assert head[0] == b"get http://h.example/ws http/1.1"
            assert b"upgrade: websocket" in head and b"connection: upgrade" in head
            await proxy.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhi")
            answer = await until(client, b"hi")
            assert answer.startswith(b"HTTP/1.1 101 ") and b"\r\nupgrade: websocket\r\n" in answer.lower()
            assert await until(proxy, b"early frame")
            await client.send(b"up")
            assert await until(proxy, b"up")
            await proxy.send(b"down")
            assert await until(client, b"down")
            client.shutdown(trio.socket.SHUT_WR)  # each direction ends on its own, with a FIN
            assert await proxy.recv(100) == b""
            await proxy.send(b"after the client's FIN")
            assert await until(client, b"after the client's FIN")
            proxy.shutdown(trio.socket.SHUT_WR)
            assert await client.recv(100) == b""
            while not ended:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    [(token, how, sent_up, sent_down)] = ended
    assert (token, how) == ("ws", "closed") and forwarder.requests == 2
    assert sent_up == len(b"early frameup") and sent_down == len(b"hidownafter the client's FIN")


# Bodies spliced past h11.


def chunk_stream(body: bytes, sizes) -> bytes:
    """``body`` chunked in pieces of the given sizes (cycled), with a trailer section."""
    out, position, index = bytearray(), 0, 0
    while position < len(body):
        size = sizes[index % len(sizes)]
        out += b"%x\r\n" % min(size, len(body) - position) + body[position : position + size] + b"\r\n"
        position, index = position + size, index + 1
    return bytes(out + b"0\r\nX-Sum: 1\r\n\r\n")


async def send_in_pieces(sock, data: bytes, cuts) -> None:
    """Send ``data`` in separate writes at each offset of ``cuts`` (the relay reads them apart)."""
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            await write_all(sock, data[start:cut])
            await trio.sleep(0.002)
            start = cut


async def read_response(sock, method: str = "GET", version: str = "1.1") -> tuple[int, bytes, list, bytes]:
    """One response: (status, body, trailers, the raw bytes read)."""
    http = h11.Connection(h11.CLIENT)
    http.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    http.send(h11.EndOfMessage())
    status, body, raw = None, bytearray(), bytearray()
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            data = await sock.recv(1 << 20)
            raw += data
            http.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body), event.headers, bytes(raw)
        elif isinstance(event, h11.ConnectionClosed):
            return status, bytes(body), [], bytes(raw)


BIG = os.urandom(5 << 20)


@pytest.mark.parametrize("framing", ["content-length", "chunked-large", "chunked-mixed"])
async def test_a_large_response_arrives_exact_and_mostly_spliced_then_the_next_request_is_served(framing, splicing):
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    if framing == "content-length":
        response = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BIG)}\r\n\r\n".encode() + BIG
    else:
        sizes = [1 << 20] if framing == "chunked-large" else [1, 70000, 5, 300000, 16384, 16383]
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_stream(BIG, sizes)
    # Cut at every kind of boundary: inside the head, its end, a chunk header, a chunk's last byte, its CRLF.
    cuts = [10, response.index(b"\r\n\r\n") + 4]
    cuts += [
        position + offset for position in (cuts[1] + 3, len(response) // 2, len(response) - 9) for offset in (0, 1)
    ]
    await client.send(get("/big") + get("/small"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"/big")
            nursery.start_soon(send_in_pieces, proxy, response, cuts)
            status, body, trailers, raw = await read_response(client)
            assert (status, hashlib.sha256(body).digest()) == (200, hashlib.sha256(BIG).digest())
            if framing != "content-length":
                assert trailers == [(b"x-sum", b"1")]
            await until(proxy, b"/small")
            await proxy.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            status, body, _, second = await read_response(client)
            assert (status, body) == (200, b"ok")
            client.shutdown(trio.socket.SHUT_WR)
    assert ended == ["closed"] and forwarder.requests == 2
    assert forwarder.sent_down == len(raw) + len(second)  # spliced bytes and framing counted as sent
    if framing != "chunked-mixed" or splicing == "every-byte":
        assert forwarder.spliced > len(BIG) - 4 * READ_SIZE  # all but what came with heads and chunk headers
    client.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_large_upload_reaches_the_proxy_exact(proxy, framing, splicing):
    client, relay_side = trio_pair()
    forwarder = forwarder_for(proxy, relay_side)
    if framing == "content-length":
        request = f"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: {len(BIG)}\r\n\r\n".encode() + BIG
    else:
        request = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_stream(BIG, [700000, 3])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forwarder.run)
            nursery.start_soon(send_in_pieces, client, request + get("/after"), [60, len(request) // 3])
            got = await responses(client, ["POST", "GET"])
            client.shutdown(trio.socket.SHUT_WR)
    assert got[0] == (200, hashlib.sha256(BIG).hexdigest().encode()) and got[1][0] == 200
    assert [request[3] for request in proxy.requests] == [BIG, b""]
    assert forwarder.spliced > len(BIG) // 2


async def test_a_chunked_response_to_an_http_10_client_is_spliced_unframed():
    """h11 sends an HTTP/1.0 client the body as it comes, ended by the close: spliced the same."""
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    await client.send(b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"\r\n\r\n")
            chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_stream(BIG, [1 << 20])
            nursery.start_soon(write_all, proxy, chunked)
            data, how = await rest(client)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
    assert how == "end" and ended == ["closed"]
    assert forwarder.spliced > len(BIG) - 8 * READ_SIZE
    client.close()


async def test_a_proxy_closing_mid_spliced_body_resets_the_client():
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    await client.send(get("/cut"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"\r\n\r\n")
            await write_all(proxy, f"HTTP/1.1 200 OK\r\nContent-Length: {len(BIG)}\r\n\r\n".encode() + BIG[: 3 << 20])
            proxy.close()
            seen, how = await rest(client)
    head, _, body = seen.partition(b"\r\n\r\n")
    assert body == BIG[: len(body)] and not complete_response(
        seen
    )  # what arrived is in order (a reset may drop the rest)
    assert how == "reset" and ended == ["proxy-protocol-error"]  # as when h11 read the body itself
    client.close()


async def test_a_body_that_trickles_reaches_the_client_as_it_comes_not_when_a_batch_fills():
    """Spliced bodies are read in batches (SO_RCVLOWAT), but never held waiting for one."""
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    await client.send(get("/slow"))
    piece, pieces = 20000, 5
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"\r\n\r\n")
            await write_all(proxy, f"HTTP/1.1 200 OK\r\nContent-Length: {pieces * piece}\r\n\r\n".encode())
            body = (await until(client, b"\r\n\r\n")).partition(b"\r\n\r\n")[2]
            for number in range(pieces):
                await write_all(proxy, bytes([number]) * piece)
                with trio.fail_after(1):  # each piece arrives on its own: a batch of 1 MiB never comes
                    while len(body) < (number + 1) * piece:
                        body += await client.recv(65536)
            client.shutdown(trio.socket.SHUT_WR)
    assert body == b"".join(bytes([number]) * piece for number in range(pieces))
    assert forwarder.spliced >= (pieces - 1) * piece
    assert ended == ["closed"]


async def test_a_proxy_closing_mid_spliced_upload_resets_the_client_and_counts_what_went(splicing):
    # squid 5.7 (its bug 5405) takes a large upload for a while, then closes without a byte of answer. The
    # client must get a reset, and the log line count the body bytes that did go (a splice cut short
    # once counted none: up=140 after 496 MB had reached squid).
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    head = f"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: {len(BIG)}\r\n\r\n".encode()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            nursery.start_soon(write_all, client, head + BIG[: 3 << 20])
            taken = len(await until(proxy, b"\r\n\r\n"))
            while taken < (1 << 20) + 200:
                taken += len(await proxy.recv(65536))
            proxy.close()  # unread bytes: a reset follows the FIN, as from squid
            seen, how = await rest(client)
            nursery.cancel_scope.cancel()  # the client's send, blocked by now
    assert (seen, how) == (b"", "reset") and ended[0] in ("proxy-closed", "upstream-reset")
    assert taken <= forwarder.sent_up <= len(head) + 100 + (3 << 20)  # the head goes in absolute form
    if splicing == "every-byte":
        assert forwarder.spliced >= taken - len(head) - READ_SIZE
    client.close()


async def test_a_splice_whose_write_fails_counts_what_reached_the_client_never_less_than_nothing():
    """The client resets while the response body is spliced: the first move() reads 64 KiB and fails writing
    them, which it cannot count."""
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
    await client.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, ended := [])
            await until(proxy, b"\r\n\r\n")
            await client.send(b"G")  # the watch peeks it and returns: nobody reads the client now
            await trio.sleep(0.05)
            await proxy.send(head)
            await until(client, b"\r\n\r\n")  # the head went: the response splice waits for body
            await trio.sleep(0.05)
            hard_close(client)
            await trio.sleep(0.05)
            await proxy.send(b"x" * 65536)
    assert ended == ["client-reset"]
    assert forwarder.sent_down >= len(head), (forwarder.sent_down, forwarder.spliced)
    assert forwarder.spliced >= 0, forwarder.spliced
    proxy.close()


def receive_low_water_mark(sock) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def test_an_upload_and_its_response_spliced_at_once_leave_no_so_rcvlowat_behind():
    """Each splice resets the low-water mark it set on its own source: one left on the kept-alive proxy
    connection would hold the next, small response until the idle timeout."""
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()
    forwarder = forwarder_to(relay_proxy, relay_client)
    request_len, response_len = 500_000, 300_000
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed, forwarder, relay_client, [])
            await client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % request_len)
            await trio.sleep(0.05)
            nursery.start_soon(write_all, client, b"q" * 200_000)
            got = len(await until(proxy, b"\r\n\r\n"))
            while got < 200_000:
                got += len(await proxy.recv(1 << 20))
            await trio.sleep(0.2)  # the upload splice waits for a batch, RCVLOWAT set on the client
            await proxy.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % response_len + b"r" * 100_000)
            seen = len(await until(client, b"\r\n\r\n"))
            await trio.sleep(0.005)  # the response splice waits for a batch: RCVLOWAT on the proxy socket
            await write_all(client, b"q" * 300_000)  # the rest of the upload, all at once
            while got < request_len:
                got += len(await proxy.recv(1 << 20))
            await write_all(proxy, b"r" * 200_000)  # the rest of the response, within the 50 ms batch wait
            while seen < response_len + 43:
                seen += len(await client.recv(1 << 20))
            # The next request on the kept-alive proxy connection: a small answer, a moment later.
            await client.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
            await until(proxy, b"/next")
            await trio.sleep(0.1)
            await proxy.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            with trio.move_on_after(2) as waited:
                await until(client, b"ok")
            assert not waited.cancelled_caught, (
                f"next response stuck; proxy SO_RCVLOWAT={receive_low_water_mark(relay_proxy)}"
            )
            nursery.cancel_scope.cancel()
