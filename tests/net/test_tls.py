"""https:// upstreams below the lab: the Dialer's TLS handshake and CONNECT, and TlsRelay's ends, against an
in-process TLS server on loopback (certificates from trustme). The lab runs them against stunnel and squid."""

import socket
import ssl
import struct
import subprocess

import pytest
import trio
import trustme

from relay import ends
from relay.config import Config, TlsOptions, Upstream
from relay.net.dial import Dialer
from relay.net.faults import UpstreamError

NAME = "proxy.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert(NAME, "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    server.issued = cert
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
    """The Dialer's open_async through ``upstream``: (socket, early bytes), or raises its UpstreamError."""
    dialer, outcome = Dialer(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.run)
        try:
            outcome.append(
                await dialer.open_async(
                    upstream,
                    [(socket.AF_INET, (upstream.host, upstream.port))],
                    target,
                    mark=None,
                    connect_timeout=timeout,
                    handshake_timeout=timeout,
                )
            )
        except UpstreamError as exc:
            outcome.append(exc)
        finally:
            dialer.close()
    if isinstance(outcome[0], UpstreamError):
        raise outcome[0]
    return outcome[0]


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


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


async def running_pump(nursery, on_finished):
    from relay.net.pump import Pump

    pump = Pump(on_finished)
    nursery.start_soon(pump.run)
    with trio.fail_after(1):
        while pump.nursery is None:
            await trio.sleep(0.001)
    return pump


async def relayed(pki, nursery, then, *, first=b"", idle=5.0, half_closed=5.0, confirm_eof=None):
    """A client socket pair's far end relayed through a TLS tunnel to ``then``'s end of the proxy."""
    ca, server = pki
    proxy = Proxy(server, then=then)
    await nursery.start(proxy.serve)
    sock, early = await dial(https(proxy.port, ca, sni=NAME))
    ours, theirs = tcp_pair()  # a unix socket pair cannot be reset
    ours.setblocking(False)
    finished = Finished()
    pump = await running_pump(nursery, finished)
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


async def read_to_end(client, within=5.0) -> tuple[bytes, str]:
    """What the client received, and how its side ended: "fin" or "reset"."""
    received = b""
    with trio.fail_after(within):
        try:
            while data := await client.recv(1 << 16):
                received += data
        except ConnectionResetError:
            return received, "reset"
    return received, "fin"


def raw_reset(transport):
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.socket.close()


async def hello_then(end):
    async def then(stream, transport):
        await stream.send_all(b"hello")
        await end(stream, transport)

    return then


async def close_notify(stream, transport):
    await stream.aclose()


async def bare_fin(stream, transport):
    transport.socket.shutdown(socket.SHUT_WR)
    await trio.sleep(5)


async def tcp_reset(stream, transport):
    await trio.sleep(0.05)  # "hello" first
    raw_reset(transport)


async def cut_record(stream, transport):
    await transport.send_all(b"\x17\x03\x03\x40\x00" + b"x" * 100)  # a 16 KB record's first 100 bytes
    transport.socket.shutdown(socket.SHUT_WR)
    await trio.sleep(5)


async def forged_record(stream, transport):
    await transport.send_all(b"\x17\x03\x03\x00\x40" + bytes(64))  # does not decrypt
    await trio.sleep(5)


@pytest.mark.parametrize(
    "end,client_sees,ended",
    [
        (close_notify, "fin", ends.CLOSED),
        (bare_fin, "fin", ends.CLOSED),
        (tcp_reset, "reset", ends.UPSTREAM_RESET),
        (cut_record, "reset", ends.UPSTREAM_TLS_TRUNCATED),
        (forged_record, "reset", ends.UPSTREAM_TLS_ERROR),
    ],
    ids=["close_notify", "bare-fin", "reset", "truncated-record", "bad-record"],
)
async def test_how_the_proxy_ends_is_how_the_client_sees_it(pki, nursery, end, client_sees, ended):
    client, finished = await relayed(pki, nursery, await hello_then(end))
    received, how = await read_to_end(client)
    assert (received, how) == (b"hello", client_sees) or (how == "reset" and client_sees == "reset")
    if how == "fin":
        client.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        await finished.done.wait()
    assert finished.calls[0][1] == ended


async def test_the_clients_fin_is_a_close_notify_and_the_proxy_may_go_on(pki, nursery):
    seen = []

    async def answer_after_eof(stream, transport):
        got = b""
        while data := await stream.receive_some(4096):  # b"": close_notify
            got += data
        seen.append(got)
        await stream.send_all(b"after your end: " + got)
        await stream.aclose()

    client, finished = await relayed(pki, nursery, answer_after_eof)
    await send_all(client, b"question")
    client.shutdown(socket.SHUT_WR)
    assert await read_to_end(client) == (b"after your end: question", "fin")
    with trio.fail_after(5):
        await finished.done.wait()
    assert seen == [b"question"]
    assert finished.calls == [("token", ends.CLOSED, 8, 24)]


async def test_the_clients_reset_resets_the_proxy(pki, nursery):
    seen = []

    async def wait_for_the_end(stream, transport):
        try:
            await transport.receive_some(4096)
        except trio.BrokenResourceError as exc:
            seen.append(type(exc.__cause__))

    client, finished = await relayed(pki, nursery, wait_for_the_end)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with trio.fail_after(5):
        await finished.done.wait()
    assert finished.calls[0][1] == ends.CLIENT_RESET
    with trio.fail_after(5):
        while not seen:
            await trio.sleep(0.01)
    assert seen == [ConnectionResetError]


async def test_an_idle_tunnel_times_out(pki, nursery):
    client, finished = await relayed(pki, nursery, bare_fin_never, idle=0.3)
    assert (await read_to_end(client))[1] == "reset"
    assert finished.calls[0][1] == ends.IDLE_TIMEOUT


async def bare_fin_never(stream, transport):
    await trio.sleep(5)


async def test_sni_is_the_given_name_or_the_host(pki, nursery):
    ca, server = pki
    names = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.issued.configure_cert(context)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    proxy = Proxy(context)
    await nursery.start(proxy.serve)
    (await dial(https(proxy.port, ca, sni=NAME)))[0].close()
    (await dial(https(proxy.port, ca)))[0].close()  # an address: checked against the IP SANs, no SNI (RFC 6066)
    assert names == [NAME, None]


async def test_a_wrong_name_is_refused_as_the_proxys_fault(pki, nursery):
    ca, server = pki
    proxy = Proxy(server)
    await nursery.start(proxy.serve)
    with pytest.raises(UpstreamError) as caught:
        await dial(https(proxy.port, ca, sni="other.test"))
    assert caught.value.reason == "tls-certificate" and caught.value.proxy_fault
    assert "Hostname mismatch" in str(caught.value)


def tls_pool(port, ca, **settings):
    from relay.metrics import Metrics
    from relay.net.upstreams import UpstreamPool, UpstreamState

    config = Config.from_values(
        {"upstream": [f"https://127.0.0.1:{port}"], "upstream-ca": str(ca), "handshake-timeout": 2, **settings}
    )
    pool = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    state = UpstreamState(config.upstreams[0], [(socket.AF_INET, ("127.0.0.1", port))], config=config)
    return pool, state


async def test_health_checks_and_the_eof_probe_speak_tls(pki, nursery):
    ca, server = pki
    proxy = Proxy(server, reply=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await nursery.start(proxy.serve)
    pool, state = tls_pool(proxy.port, ca)
    await pool.check(state)
    assert proxy.requests == [b"GET / HTTP/1.0\r\n\r\n"]  # the question inside TLS
    assert await state.still_there() is True


async def test_a_health_check_refuses_a_certificate_that_fails(pki, nursery):
    ca, server = pki
    proxy = Proxy(server)
    await nursery.start(proxy.serve)
    pool, state = tls_pool(proxy.port, ca, **{"upstream-sni": "other.test"})
    with pytest.raises(UpstreamError) as caught:
        await pool.check(state)
    assert caught.value.reason == "tls-certificate"
    assert proxy.requests == []


async def test_the_pump_counts_tls_connections_and_cancels_them_on_close(pki, nursery):
    ca, server = pki
    proxy = Proxy(server, then=bare_fin_never)
    await nursery.start(proxy.serve)
    sock, early = await dial(https(proxy.port, ca, sni=NAME))
    ours, theirs = tcp_pair()
    finished = Finished()
    pump = await running_pump(nursery, finished)
    pump.add(theirs, sock, "token", idle_timeout=5, half_closed_timeout=5, to_upstream_first=b"abc")
    await trio.sleep(0.1)
    assert len(pump) == 1 and pump.counts() == [("token", 3, 0)]
    pump.close()
    assert finished.calls == [("token", ends.CANCELLED, 3, 0)] and len(pump) == 0
    ours.close()


async def test_a_tls_1_2_proxy_that_renegotiates_mid_tunnel_keeps_working(pki, nursery, tmp_path):
    """openssl s_server (TLS 1.2) as the proxy: its answer to CONNECT, then a renegotiation (its "R"
    command), then more data: the handshake messages pass through the same memory BIOs (what reading
    queued is flushed), and the client gets every byte."""
    ca, server = pki
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    server.issued.private_key_pem.write_to_path(str(key))
    server.issued.cert_chain_pems[0].write_to_path(str(cert))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key), "-tls1_2",
            "-ign_eof"]  # fmt: skip
    process = await trio.lowlevel.open_process(["stdbuf", "-o0", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(5):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except ConnectionRefusedError:
                    await trio.sleep(0.05)
        opened = []

        async def open_it():
            opened.append(await dial(https(port, ca, sni=NAME)))

        nursery.start_soon(open_it)
        await trio.sleep(0.5)
        await process.stdin.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
        with trio.fail_after(5):
            while not opened:
                await trio.sleep(0.01)
        sock, early = opened[0]
        assert sock.session.version == "TLSv1.2"
        ours, theirs = tcp_pair()
        finished = Finished()
        pump = await running_pump(nursery, finished)
        pump.add(theirs, sock, "token", idle_timeout=5, half_closed_timeout=5, to_client_first=early)
        client = trio.socket.from_stdlib_socket(ours)
        await process.stdin.send_all(b"before\n")
        await trio.sleep(0.3)  # apart: s_server takes "R" as its command only when read alone
        await process.stdin.send_all(b"R\n")
        await trio.sleep(0.3)
        await process.stdin.send_all(b"after the renegotiation\n")
        received = b""
        with trio.fail_after(5):
            while b"after the renegotiation\n" not in received:
                data = await client.recv(4096)
                assert data, received
                received += data
        assert received.startswith(b"before\n")
        client.close()
        said = b""  # s_server says when the renegotiation's handshake completed: after the CONNECT it read
        with trio.move_on_after(5):
            while b"SSL_do_handshake -> 1" not in said.partition(b"CONNECT example.org")[2]:
                said += await process.stdout.receive_some(4096)
        assert b"SSL_do_handshake -> 1" in said.partition(b"CONNECT example.org")[2], said
    finally:
        process.kill()
        await process.wait()
