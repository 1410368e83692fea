"""Property: whatever a client puts in Connection, Content-Length and Transfer-Encoding, forwarding
ends as a response, a failure with a name, or a tunnel; never an exception (which the connection
would log as an internal error, with a traceback). And what reaches the proxy is well framed: each
request it reads is one the client sent, with the body h11 read from the client, and never with
both framings. Nor does anything a proxy answers, to any client, make forwarding raise."""

from unittest import mock

import h11
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.net import http_forward
from relay.net.http_forward import ForwardFailed, HttpForwarder, NeedsTunnel
from tests.net.test_pump import trio_pair

GOOD = b"GET /first HTTP/1.1\r\nHost: h.example\r\n\r\n"
CONNECTION_TOKENS = [
    "content-length",
    "Content-Length",
    "transfer-encoding",
    "TRANSFER-ENCODING",
    "close",
    "keep-alive",
    "host",
    "te",
    "x-hop",
]


class StrictProxy:
    """A forward proxy that answers every complete request with an empty 200 and keeps what it
    read: the requests with their bodies, and whatever it could not parse."""

    def __init__(self):
        self.requests = []  # (h11.Request, body)
        self.malformed = []

    async def serve(self, sock):
        http = h11.Connection(h11.SERVER)
        request, body = None, b""
        try:
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await sock.recv(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.requests.append((request, body))
                    await sock.send(http.send(h11.Response(status_code=200, headers=[("Content-Length", "0")])))
                    http.send(h11.EndOfMessage())
                    http.start_next_cycle()
                else:  # the relay closed between requests
                    return
        except h11.RemoteProtocolError as exc:  # includes an end of data in the middle of a request
            self.malformed.append(exc)
        except OSError:  # a reset: the proxy drops a partial request
            pass
        finally:
            sock.close()


def chunked(body: bytes, trailer: bool) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part)
    return chunks + b"0\r\n" + (b"X-Sum: 1\r\n" if trailer else b"") + b"\r\n"


@st.composite
def hostile_requests(draw) -> bytes:
    body = draw(st.binary(max_size=30))
    n = len(body)
    fields = ["Host: h.example"]
    if tokens := draw(st.lists(st.sampled_from(CONNECTION_TOKENS), max_size=3)):
        fields.append("Connection: " + ", ".join(tokens))
    lengths = [n, n + 1, max(n - 1, 0), 0, f"{n}, {n}", f"{n},{n + 1}", "x"]
    fields += [f"Content-Length: {length}" for length in draw(st.lists(st.sampled_from(lengths), max_size=2))]
    encoding = draw(st.sampled_from([None, "chunked", "Chunked", "gzip, chunked", "identity"]))
    if encoding:
        fields.append(f"Transfer-Encoding: {encoding}")
    if draw(st.booleans()):
        fields.append("Expect: 100-continue")
    fields = draw(st.permutations(fields))
    method = draw(st.sampled_from(["POST", "PUT", "GET"]))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    head = f"{method} /up HTTP/{version}\r\n" + "".join(f"{field}\r\n" for field in fields) + "\r\n"
    return head.encode() + (chunked(body, draw(st.booleans())) if encoding else body)


def as_the_relay_reads(data: bytes) -> list[bytes]:
    """The bodies of the complete requests h11 (as the relay's server side) finds in ``data``."""
    http, bodies, body = h11.Connection(h11.SERVER), [], b""
    http.receive_data(data)
    try:
        while True:
            event = http.next_event()
            if isinstance(event, h11.Request):
                body = b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                bodies.append(body)
                http.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                http.send(h11.EndOfMessage())
                http.start_next_cycle()
            else:
                return bodies
    except h11.ProtocolError:
        return bodies


async def how_it_ends(forwarder: HttpForwarder) -> str:
    """Its end word, or "tunnel"; any other exception fails the test."""
    try:
        return await forwarder.run()
    except ForwardFailed as exc:
        return exc.ended
    except NeedsTunnel:
        return "tunnel"


async def forward(data: bytes):
    """Forward what a client sends as ``data`` to a StrictProxy: how the forwarder ended, and the proxy."""
    proxy = StrictProxy()
    client, relay_client = trio_pair()

    async with trio.open_nursery() as nursery:

        async def open_proxy(fresh=False):
            relay_end, proxy_end = trio_pair()
            nursery.start_soon(proxy.serve, proxy_end)
            return relay_end, False

        # A short idle timeout ends the forwarder where the client still owes part of a request.
        forwarder = HttpForwarder(
            relay_client,
            b"",
            ("10.9.9.9", 80),
            open_proxy,
            usable_name=lambda name: name,
            proxy_authorization=None,
            idle_timeout=0.2,
        )

        async def read_answers():
            """Read what the relay sends; end the connection once every complete request is answered."""
            seen, answers = b"", len(as_the_relay_reads(data))
            try:
                while chunk := await client.recv(65536):
                    seen += chunk
                    if seen.count(b"HTTP/1.1 200 ") == answers:
                        client.shutdown(trio.socket.SHUT_WR)
            except OSError:
                pass

        nursery.start_soon(read_answers)
        await client.send(data)
        ended = await how_it_ends(forwarder)
        relay_client.close()
    client.close()
    return ended, proxy


@settings(max_examples=150, deadline=None)
@given(request=hostile_requests(), first=st.booleans(), spliced=st.booleans())
def test_hostile_framing_is_forwarded_well_framed_or_refused_never_an_internal_error(request, first, spliced):
    data = request if first else GOOD + request  # second: past the first, nothing falls back to a tunnel
    with mock.patch.object(
        http_forward, "PASS_MIN", 1 if spliced else http_forward.PASS_MIN
    ):  # every body byte h11 may skip
        ended, proxy = trio.run(forward, data)
    assert isinstance(ended, str)  # any other exception has failed the test already
    assert proxy.malformed == []
    got = [body for _, body in proxy.requests]
    assert got == as_the_relay_reads(data)[: len(got)]
    for forwarded, _ in proxy.requests:
        names = [name for name, _ in forwarded.headers]
        assert not (b"content-length" in names and b"transfer-encoding" in names)


@st.composite
def proxy_answers(draw) -> bytes:
    """A final response, maybe after a 1xx, framed in any way, right or wrong, maybe with trailers."""
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\n\r\n"]))
    status = draw(st.sampled_from([b"200 OK", b"200 OK", b"204 No Content", b"304 Not Modified", b"101 Switching"]))
    framing = draw(
        st.sampled_from(
            [
                [],
                [b"Content-Length: 5"],
                [b"Transfer-Encoding: chunked"],
                [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
            ]
        )
    )
    others = [b"Content-Length: 5, 5", b"Connection: close", b"Connection: content-length, transfer-encoding"]
    fields = framing + draw(st.lists(st.sampled_from(others), max_size=2, unique=True))
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"]))
    return interim + b"HTTP/1.1 " + status + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body


async def answer(request: bytes, method: str, response: bytes):
    """The proxy sends ``response`` to ``request`` and closes; how the forwarder ended."""
    client, relay_client = trio_pair()
    relay_proxy, proxy = trio_pair()

    async def open_proxy(fresh=False):
        return relay_proxy, False

    forwarder = HttpForwarder(
        relay_client,
        b"",
        ("10.9.9.9", 80),
        open_proxy,
        usable_name=lambda name: name,
        proxy_authorization=None,
        idle_timeout=10,
    )

    async def read_answer():
        """Read until a whole response came (then leave, as a client does) or the relay ends it."""
        http = h11.Connection(h11.CLIENT)
        http.send(h11.Request(method=method, target="/", headers=[("Host", "h")]))
        http.send(h11.EndOfMessage())
        try:
            while not isinstance(event := http.next_event(), (h11.EndOfMessage, h11.ConnectionClosed)):
                if event is h11.NEED_DATA:
                    http.receive_data(await client.recv(65536))
        except (OSError, h11.RemoteProtocolError):
            pass
        client.close()

    async def play_proxy():
        await proxy.recv(65536)  # the request, in one piece on loopback
        await proxy.send(response)
        proxy.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_answer)
        nursery.start_soon(play_proxy)
        await client.send(request)
        ended = await how_it_ends(forwarder)
        relay_client.close()
    return ended


@settings(max_examples=300, deadline=None)
@given(
    client=st.sampled_from([("GET", "1.1"), ("GET", "1.0"), ("HEAD", "1.1"), ("HEAD", "1.0")]),
    response=proxy_answers(),
    spliced=st.booleans(),
)
def test_whatever_the_proxy_answers_forwarding_never_raises(client, response, spliced):
    method, version = client
    request = f"{method} /x HTTP/{version}\r\nHost: h\r\n\r\n".encode()
    with mock.patch.object(http_forward, "PASS_MIN", 1 if spliced else http_forward.PASS_MIN):
        assert isinstance(trio.run(answer, request, method, response), str)
