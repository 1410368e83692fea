"""https:// upstreams below the lab: the Dialer's TLS handshake and CONNECT, and TlsRelay's ends, against an
in-process TLS server on loopback (certificates from trustme). The lab runs them against stunnel and squid."""

import socket
import ssl

import pytest
import trio
import trustme

from relay import ends
from relay.config import TlsOptions, Upstream
from relay.net.dial import Dialer

NAME = "proxy.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert(NAME, "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    return directory / "ca.pem", server


class Proxy:
    """A TLS listener on loopback playing an HTTP proxy: answers CONNECT with ``reply``, then runs ``then``."""

    def __init__(self, context, reply=b"HTTP/1.1 200 Connection established\r\n\r\n", then=None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.context, self.reply, self.then = context, reply, then
        self.requests = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener))
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.handle, stream)

    async def handle(self, transport):
        stream = trio.SSLStream(transport, self.context, server_side=True)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
            self.requests.append(request)
            await stream.send_all(self.reply)
            if self.then is not None:
                await self.then(stream, transport)
        except trio.BrokenResourceError:
            pass


def https(port, ca, **tls) -> Upstream:
    return Upstream("https", "127.0.0.1", port, tls=TlsOptions(ca=str(ca), **tls))


async def dial(upstream, target=("example.org", 443), timeout=5.0):
    dialer = Dialer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.run)
        try:
            return await dialer.open_async(
                upstream,
                [(socket.AF_INET, (upstream.host, upstream.port))],
                target,
                mark=None,
                connect_timeout=timeout,
                handshake_timeout=timeout,
            )
        finally:
            dialer.close()


async def test_connect_over_tls_opens_the_tunnel(pki, nursery):
    ca, server = pki
    proxy = Proxy(server)
    await nursery.start(proxy.serve)
    sock, early = await dial(https(proxy.port, ca, sni=NAME))
    assert sock.session.version in ("TLSv1.2", "TLSv1.3")
    assert proxy.requests[0].startswith(b"CONNECT example.org:443 HTTP/1.1\r\n")
    sock.close()


class Finished:
    def __init__(self):
        self.calls = []
        self.done = trio.Event()

    def __call__(self, token, ended, up, down):
        self.calls.append((token, ended, up, down))
        self.done.set()


async def relayed(pki, nursery, then, *, first=b"", idle=5.0, half_closed=5.0, confirm_eof=None):
    """A client socket pair's far end relayed through a TLS tunnel to ``then``'s end of the proxy."""
    from relay.net.pump import Pump

    ca, server = pki
    proxy = Proxy(server, then=then)
    await nursery.start(proxy.serve)
    sock, early = await dial(https(proxy.port, ca, sni=NAME))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    finished = Finished()
    pump = Pump(finished)
    nursery.start_soon(pump.run)
    with trio.fail_after(1):
        while pump.nursery is None:
            await trio.sleep(0.001)
    pump.add(theirs, sock, "token", idle_timeout=idle, half_closed_timeout=half_closed, to_upstream_first=first,
             to_client_first=early, confirm_eof=confirm_eof)  # fmt: skip
    return trio.socket.from_stdlib_socket(ours), finished


async def send_all(sock, data):
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def test_bytes_both_ways_and_clean_ends(pki, nursery):
    async def echo_then_close(stream, transport):
        got = b""
        while len(got) < 1 << 20:
            data = await stream.receive_some(65536)
            got += data
            await stream.send_all(data)
        await stream.aclose()  # close_notify

    client, finished = await relayed(pki, nursery, echo_then_close, first=b"x" * 100)
    payload = b"x" * ((1 << 20) - 100)
    async with trio.open_nursery() as inner:
        inner.start_soon(send_all, client, payload)
        received = b""
        with trio.fail_after(5):
            while data := await client.recv(1 << 16):
                received += data
    assert received == b"x" * (1 << 20)
    client.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        await finished.done.wait()
    assert finished.calls == [("token", ends.CLOSED, 1 << 20, 1 << 20)]
