"""HttpForwarder against a fake forward proxy on loopback: pipelining, 100-continue,
HEAD, early responses, the proxy ending keep-alive, and when to fall back to a tunnel."""

import hashlib
from functools import partial

import h11
import pytest
import trio

from relay.net.http_forward import ForwardFailed, HttpForwarder, NeedsTunnel
from tests.test_pump import trio_pair


class FakeProxy:
    """An h11 forward proxy that answers by path and records what it was asked."""

    def __init__(self):
        self.requests = []  # (method, target, headers dict, body)
        self.connections = 0

    async def serve(self, stream):
        self.connections += 1
        http = h11.Connection(h11.SERVER)

        async def next_event():
            while (event := http.next_event()) is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(65536))
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
                await send(h11.Response(status_code=413, headers=[("Content-Length", "0"), ("Connection", "close")]), h11.EndOfMessage())
                self.requests.append((request.method, request.target, headers, None))
                return
            if headers.get(b"expect") == b"100-continue":
                await send(h11.InformationalResponse(status_code=100, headers=[]))
            body = b""
            while isinstance(event := await next_event(), h11.Data):
                body += event.data
            self.requests.append((request.method, request.target, headers, body))
            reply = hashlib.sha256(body).hexdigest().encode() if body else b"ok " + request.target
            extra = [("Connection", "close")] if path == "close" else []
            await send(h11.Response(status_code=200, headers=[("Content-Length", str(1000 if path == "head" else len(reply))), *extra]))
            if request.method != b"HEAD":
                await send(h11.Data(data=reply))
            await send(h11.EndOfMessage())
            if http.our_state is h11.MUST_CLOSE:
                return
            http.start_next_cycle()


@pytest.fixture
async def proxy(nursery):
    fake = FakeProxy()
    listeners = await nursery.start(partial(trio.serve_tcp, fake.serve, 0, host="127.0.0.1"))
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


def forwarder_for(proxy, client_side, first=b""):
    async def open_proxy():
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", proxy.port))
        return sock

    return HttpForwarder(client_side, first, ("10.9.9.9", 8080), open_proxy,
                         use_names=True, proxy_authorization=b"Basic cHJveHk6cGFzcw==", idle_timeout=10)


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
        await client.send(f"PUT /up HTTP/1.1\r\nHost: h.example\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
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


@pytest.mark.parametrize("first", [
    get("/ws").replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
])
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
    await client.send(get("/a") + get("/ws").replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
    with pytest.raises(ForwardFailed, match="client-upgrade-after-requests"):
        with trio.fail_after(5):
            await forwarder.run()
