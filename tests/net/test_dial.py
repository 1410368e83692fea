"""The Dialer: upstream connections opened without a task each, against real loopback sockets.

The proxy side is played by the test on a loopback listener (fakes are fine
here: the handshake machines have their own tests, and the e2e suite runs the
Dialer against squid, dante and ssh); what is checked is the Dialer's I/O:
every outcome reaches exactly one callback, sockets are reset on failure,
timeouts fire, and the bytes after the proxy's reply are kept.
"""

import errno
import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio

from relay.config import Upstream
from relay.net.dial import SO_MARK, Dialer, apply_mark
from relay.net.faults import Fault, UpstreamError
from tests.root import require_root

SOCKS5 = Upstream("socks5", "127.0.0.1", 1)
SOCKS5_GREETING = b"\x05\x01\x00"
SOCKS5_REQUEST = b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb"  # 10.0.0.1:443
SOCKS5_SUCCESS = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


@asynccontextmanager
async def running_dialer():
    dialer = Dialer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.run)
        try:
            yield dialer
        finally:
            dialer.close()


class Outcome:
    """Collects what the callbacks said; exactly one call is expected."""

    def __init__(self):
        self.calls = []
        self.done = trio.Event()

    def opened(self, sock, early):
        self.calls.append(("opened", sock, early))
        self.done.set()

    def failed(self, error):
        self.calls.append(("failed", error))
        self.done.set()

    async def wait(self, seconds=5):
        with trio.fail_after(seconds):
            await self.done.wait()
        await trio.sleep(0.05)  # a second call would come now
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def listener(backlog=8) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def closed_port() -> tuple[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


def open_through(
    dialer,
    upstream,
    addresses,
    target=("10.0.0.1", 443),
    *,
    connect_timeout=2.0,
    handshake_timeout=2.0,
    early_data=b"",
) -> Outcome:
    outcome = Outcome()
    outcome.dialing = dialer.open(
        upstream,
        addresses,
        target,
        mark=None,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        on_open=outcome.opened,
        on_fail=outcome.failed,
        early_data=early_data,
    )
    return outcome


async def accept(sock: socket.socket) -> trio.socket.SocketType:
    trio_listener = trio.socket.from_stdlib_socket(sock.dup())
    with trio_listener:
        conn, _ = await trio_listener.accept()
    return conn


async def receive_exactly(conn, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await conn.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def play_socks5_until_the_reply(conn) -> None:
    """The proxy's side of a SOCKS5 handshake, up to its final reply (the test's to send)."""
    assert await receive_exactly(conn, 3) == SOCKS5_GREETING
    await conn.send(b"\x05\x00")
    assert await receive_exactly(conn, len(SOCKS5_REQUEST)) == SOCKS5_REQUEST


async def assert_reset(conn) -> None:
    """Read until the end, which must be a reset, not a clean FIN."""
    with trio.fail_after(2):
        with pytest.raises(OSError) as raised:
            while await conn.recv(100):
                pass
    assert raised.value.errno == errno.ECONNRESET


@pytest.mark.parametrize("split", ["whole", "bytewise", "with-trailing"])
async def test_socks5_handshake_in_any_split_keeps_what_followed_the_reply(split):
    with listener() as proxy:
        async with running_dialer() as dialer:
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            conn = await accept(proxy)
            with conn:
                await play_socks5_until_the_reply(conn)
                reply = SOCKS5_SUCCESS + (b"server spoke first" if split == "with-trailing" else b"")
                if split == "bytewise":
                    for byte in reply:
                        await conn.send(bytes([byte]))
                        await trio.sleep(0.005)
                else:
                    await conn.send(reply)
                kind, sock, early = await outcome.wait()
                assert kind == "opened"
                assert early == (b"server spoke first" if split == "with-trailing" else b"")
                with sock:
                    assert not sock.getblocking() and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    sock.send(b"tunnel")
                    assert await receive_exactly(conn, 6) == b"tunnel"
            assert len(dialer) == 0


async def test_http_connect_and_direct():
    with listener() as proxy, listener() as server:
        async with running_dialer() as dialer:
            outcome = open_through(
                dialer, Upstream("http", "127.0.0.1", 1), [(socket.AF_INET, proxy.getsockname())], ("example.org", 443)
            )
            conn = await accept(proxy)
            with conn:
                request = await conn.recv(1000)
                assert request.startswith(b"CONNECT example.org:443 HTTP/1.1\r\n")
                await conn.send(b"HTTP/1.1 200 Connection established\r\n\r\nhello")
                kind, sock, early = await outcome.wait()
                assert (kind, early) == ("opened", b"hello")
                sock.close()
            # Direct: no handshake, the target's own address; over loopback it opens inside open().
            outcome = open_through(dialer, Upstream("direct"), [], server.getsockname())
            assert outcome.calls and outcome.calls[0][0] == "opened" and outcome.calls[0][2] == b""
            outcome.calls[0][1].close()


async def test_the_next_address_when_one_refuses():
    with listener() as proxy:
        async with running_dialer() as dialer:
            addresses = [(socket.AF_INET, closed_port()), (socket.AF_INET, proxy.getsockname())]
            open_through(dialer, SOCKS5, addresses)
            conn = await accept(proxy)
            with conn:
                assert await receive_exactly(conn, 3) == SOCKS5_GREETING


async def test_refused_everywhere_names_the_first_address():
    async with running_dialer() as dialer:
        where = closed_port()
        outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, where), (socket.AF_INET, closed_port())])
        kind, error = await outcome.wait()
        assert kind == "failed" and error.reason == "connect-econnrefused" and error.proxy_fault
        assert f"{where[0]}:{where[1]}" in str(error)


@pytest.mark.parametrize(
    "reply, reason, fault, retry_by_address",
    [
        (b"", "proxy-closed", Fault.TARGET, True),  # e.g. ssh -D when the far side fails
        (b"\x05\x00\x05\x04\x00\x01" + bytes(6), "socks5-host-unreachable", Fault.TARGET, True),
        (b"HTTP/1.1 200 OK\r\n\r\n", "proxy-protocol-error", Fault.PROXY, False),
        (b"\x05\xff", "socks5-no-acceptable-method", Fault.PROXY, False),
    ],
)
async def test_failed_handshakes_reset_the_proxy_and_say_why(reply, reason, fault, retry_by_address):
    with listener() as proxy:
        async with running_dialer() as dialer:
            dialer.pipelining[SOCKS5] = False  # one message at a time: no second try without pipelining
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            conn = await accept(proxy)
            with conn:
                await receive_exactly(conn, 3)
                if reply:
                    await conn.send(reply)
                else:
                    conn.shutdown(socket.SHUT_WR)
                kind, error = await outcome.wait()
                assert kind == "failed" and isinstance(error, UpstreamError)
                assert (error.reason, error.fault, error.retry_by_address) == (reason, fault, retry_by_address)
                await assert_reset(conn)
            assert len(dialer) == 0


async def test_a_silent_proxy_times_out():
    with listener() as proxy:
        async with running_dialer() as dialer:
            started = trio.current_time()
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())], handshake_timeout=0.3)
            kind, error = await outcome.wait()
            assert kind == "failed" and error.reason == "handshake-timeout" and error.proxy_fault
            assert 0.25 < trio.current_time() - started < 1.5


async def test_connect_timeout_is_one_for_all_addresses():
    """A listener whose accept queue is full drops SYNs: connecting waits, then times out."""
    with listener(backlog=0) as proxy:
        queued = []
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(proxy.getsockname())
            queued.append(sock)
        async with running_dialer() as dialer:
            started = trio.current_time()
            addresses = [(socket.AF_INET, proxy.getsockname())] * 2
            outcome = open_through(dialer, SOCKS5, addresses, connect_timeout=0.4)
            kind, error = await outcome.wait()
            assert kind == "failed" and error.reason == "connect-timeout"
            assert 0.35 < trio.current_time() - started < 1.2
        for sock in queued:
            sock.close()


async def test_unsupported_destination_fails_at_once():
    async with running_dialer() as dialer:
        outcome = open_through(
            dialer, Upstream("socks4", "127.0.0.1", 1), [(socket.AF_INET, closed_port())], ("2001:db8::1", 443)
        )
        assert outcome.calls[0][0] == "failed" and outcome.calls[0][1].reason == "unsupported-destination"


async def test_cancel_resets_without_a_callback_and_close_fails_the_rest():
    with listener() as proxy:
        async with running_dialer() as dialer:
            cancelled = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            left = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            first, second = await accept(proxy), await accept(proxy)
            assert len(dialer) == 2
            dialer.cancel(cancelled.dialing)
            dialer.cancel(cancelled.dialing)  # twice: nothing more
            dialer.close()
            kind, error = await left.wait()
            assert kind == "failed" and error.reason == "cancelled"
            assert cancelled.calls == []
            for conn in (first, second):
                with conn:
                    await assert_reset(conn)
            late = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            assert late.calls[0][0] == "failed" and late.calls[0][1].reason == "cancelled"


async def test_a_failing_callback_costs_only_its_connection(caplog):
    with listener() as server:
        async with running_dialer() as dialer:

            def broken(sock, early):
                sock.close()
                raise RuntimeError("bug")

            dialer.open(
                Upstream("direct"),
                [],
                server.getsockname(),
                mark=None,
                connect_timeout=1,
                handshake_timeout=1,
                on_open=broken,
                on_fail=None,
            )
            assert "internal error after opening an upstream connection" in caplog.text
            outcome = open_through(dialer, Upstream("direct"), [], server.getsockname())
            assert outcome.calls[0][0] == "opened"
            outcome.calls[0][1].close()


async def test_open_async_returns_or_raises_and_resets_when_cancelled():
    with listener() as proxy, listener() as server:
        async with running_dialer() as dialer:
            sock, early = await dialer.open_async(
                Upstream("direct"), [], server.getsockname(), mark=None, connect_timeout=1, handshake_timeout=1
            )
            assert early == b"" and sock.getpeername() == server.getsockname()
            sock.close()
            with pytest.raises(UpstreamError) as raised:
                await dialer.open_async(
                    SOCKS5,
                    [(socket.AF_INET, closed_port())],
                    ("10.0.0.1", 1),
                    mark=None,
                    connect_timeout=1,
                    handshake_timeout=1,
                )
            assert raised.value.reason == "connect-econnrefused"
            with trio.move_on_after(0.2):
                await dialer.open_async(
                    SOCKS5,
                    [(socket.AF_INET, proxy.getsockname())],
                    ("10.0.0.1", 1),
                    mark=None,
                    connect_timeout=1,
                    handshake_timeout=5,
                )
            assert len(dialer) == 0
            with await accept(proxy) as conn:
                await assert_reset(conn)


async def test_handshake_bytes_the_socket_cannot_take_at_once_are_sent_later(monkeypatch):
    """os.write taking part of a message (a full send buffer): the rest goes out when writable.
    Once open, the dial lets go of its machine and callbacks: its deadline stays in the heap until
    it passes, and must not keep the connection alive."""
    import relay.net.dial as dial

    writes = []
    real_write = dial.os.write

    def stingy_write(fd, data):
        writes.append(len(data))
        if len(writes) == 1:
            return real_write(fd, bytes(data[:1]))
        if len(writes) == 2:
            raise BlockingIOError(errno.EAGAIN, "full")
        return real_write(fd, data)

    monkeypatch.setattr(dial.os, "write", stingy_write)
    with listener() as proxy:
        async with running_dialer() as dialer:
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            conn = await accept(proxy)
            with conn:
                await play_socks5_until_the_reply(conn)
                await conn.send(SOCKS5_SUCCESS)
                kind, sock, _ = await outcome.wait()
                assert kind == "opened"
                sock.close()
    assert writes[:3] == [13, 12, 12]  # greeting and request at once (pipelined), then the rest of them
    dialing = outcome.dialing
    assert (dialing.sock, dialing.machine, dialing.on_open, dialing.on_fail) == (None, None, None, None)


async def test_finished_dials_do_not_pile_up_in_the_deadline_heap():
    """Each handshake leaves a deadline in the heap; those of finished dials are dropped once they
    are more than half of it, instead of staying until their time (10 s of connections)."""
    from relay.net.readiness import STALE_MIN

    with listener(backlog=1024) as proxy:
        async with running_dialer() as dialer:
            outcomes = [
                open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())], handshake_timeout=60)
                for _ in range(3 * STALE_MIN)
            ]
            assert len(dialer) == 3 * STALE_MIN and len(dialer._loop._timers) == 3 * STALE_MIN
            for outcome in outcomes:
                dialer.cancel(outcome.dialing)
            assert len(dialer) == 0 and len(dialer._loop._timers) <= STALE_MIN
            late = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())], handshake_timeout=0.2)
            kind, error = await late.wait()  # the live deadline still fires among the stale ones
            assert error.reason == "handshake-timeout"


def open_reporting_slow(dialer, proxy, slow, *, slow_after, handshake_timeout=5.0) -> Outcome:
    outcome = Outcome()
    outcome.dialing = dialer.open(
        SOCKS5,
        [(socket.AF_INET, proxy.getsockname())],
        ("10.0.0.1", 443),
        mark=None,
        connect_timeout=2,
        handshake_timeout=handshake_timeout,
        on_open=outcome.opened,
        on_fail=outcome.failed,
        slow_after=slow_after,
        on_slow=lambda: slow.append(list(outcome.calls)),
    )
    return outcome


async def test_a_proxy_slow_to_answer_is_reported_once_and_the_dial_goes_on():
    """on_slow: the proxy was reached but has not given its final answer within slow_after; the
    handshake keeps its own deadline. A proxy that answers in time is never reported."""
    with listener() as proxy:
        async with running_dialer() as dialer:
            slow = []
            outcome = open_reporting_slow(dialer, proxy, slow, slow_after=0.1)
            with await accept(proxy) as conn:
                await play_socks5_until_the_reply(conn)
                with trio.fail_after(2):
                    while not slow:
                        await trio.sleep(0.01)
                await conn.send(SOCKS5_SUCCESS)
                kind, sock, _ = await outcome.wait()
                assert kind == "opened" and slow == [[]]  # reported before it opened, once
                sock.close()

            quick = []
            outcome = open_reporting_slow(dialer, proxy, quick, slow_after=0.2)
            with await accept(proxy) as conn:
                await play_socks5_until_the_reply(conn)
                await conn.send(SOCKS5_SUCCESS)
                kind, sock, _ = await outcome.wait()
                sock.close()
            await trio.sleep(0.3)
            assert kind == "opened" and quick == []

            silent = []
            outcome = open_reporting_slow(dialer, proxy, silent, slow_after=0.1, handshake_timeout=0.4)
            with await accept(proxy):
                kind, error = await outcome.wait()
            assert kind == "failed" and error.reason == "handshake-timeout" and silent == [[]]
            assert outcome.dialing.timer is None and len(dialer) == 0


async def test_a_socks5_proxy_that_takes_a_pipelined_handshake_gets_one_from_then_on():
    with listener() as proxy:
        async with running_dialer() as dialer:
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            conn = await accept(proxy)
            with conn:
                assert await receive_exactly(conn, 13) == SOCKS5_GREETING + SOCKS5_REQUEST
                await conn.send(b"\x05\x00" + SOCKS5_SUCCESS)
                kind, sock, _ = await outcome.wait()
                sock.close()
            assert kind == "opened" and dialer.pipelining == {SOCKS5: True}
            # Known to take it: a failure is the proxy's answer, not tried again one message at a time.
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
            conn = await accept(proxy)
            with conn:
                assert await receive_exactly(conn, 13) == SOCKS5_GREETING + SOCKS5_REQUEST
                conn.shutdown(socket.SHUT_WR)
                kind, error = await outcome.wait()
            assert (kind, error.reason) == ("failed", "proxy-closed")
            proxy.setblocking(False)
            with pytest.raises(BlockingIOError):
                proxy.accept()
            assert dialer.pipelining == {SOCKS5: True}


async def test_a_pipelined_socks5_handshake_that_times_out_is_not_tried_again():
    """A proxy silent after the greeting may have dropped the request, or still be connecting to a blackholed
    destination; the latter is common, and trying again would double its timeout: one timeout, no retry."""
    with listener() as proxy:
        async with running_dialer() as dialer:
            started = trio.current_time()
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())], handshake_timeout=0.5)
            conn = await accept(proxy)
            with conn:
                assert await receive_exactly(conn, 13) == SOCKS5_GREETING + SOCKS5_REQUEST
                await conn.send(b"\x05\x00")
                kind, error = await outcome.wait()
            assert (kind, error.reason) == ("failed", "handshake-timeout")
            assert trio.current_time() - started < 1.5
            proxy.setblocking(False)
            with pytest.raises(BlockingIOError):
                proxy.accept()
            assert dialer.pipelining == {}


@pytest.mark.parametrize("refusal", ["closes", "garbles"])
async def test_a_socks5_proxy_that_fails_a_pipelined_handshake_gets_one_message_at_a_time(refusal):
    """A proxy that reads the greeting alone and then closes, or takes the rest for garbage: the same dial
    tries once more, one message at a time, and the proxy is remembered as such."""
    with listener() as proxy:
        async with running_dialer() as dialer:
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())], handshake_timeout=0.5)
            conn = await accept(proxy)
            with conn:
                assert await receive_exactly(conn, 13) == SOCKS5_GREETING + SOCKS5_REQUEST
                await conn.send(b"\x05\x02" if refusal == "garbles" else b"\x05\x00")  # garbles: a method not offered
                if refusal == "closes":
                    conn.shutdown(socket.SHUT_WR)
                with trio.fail_after(5):  # without the fallback: failed, and no second connection
                    retry = await accept(proxy)
                assert outcome.calls == []
            for _ in range(2):  # the retry, then the next dial, which goes one message at a time from the start
                with retry:
                    with trio.move_on_after(0.2):  # nothing but the greeting comes before the proxy answers it
                        assert await retry.recv(100) == SOCKS5_GREETING
                        await retry.recv(100)
                    await retry.send(b"\x05\x00")
                    assert await receive_exactly(retry, len(SOCKS5_REQUEST)) == SOCKS5_REQUEST
                    await retry.send(SOCKS5_SUCCESS + b"early")
                    kind, sock, early = await outcome.wait()
                    assert (kind, early) == ("opened", b"early")
                    sock.close()
                assert dialer.pipelining == {SOCKS5: False}
                outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, proxy.getsockname())])
                retry = await accept(proxy)
            retry.close()


SOCKS5_UDP_ASSOCIATE = b"\x05\x03\x00\x01" + bytes(6)  # from 0.0.0.0:0 (RFC 1928: all zeros)
SOCKS5_UDP_BOUND = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"  # its relay at 127.0.0.1:8080


async def associate_through(dialer, proxy: socket.socket):
    address = [(socket.AF_INET, proxy.getsockname())]
    return await dialer.associate_udp(SOCKS5, address, mark=None, connect_timeout=2, handshake_timeout=2)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (SOCKS5_UDP_BOUND, None),
        (b"\x05\x07\x00\x01" + bytes(6), "socks5-command-not-supported"),  # ssh -D, or dante told no
        (SOCKS5_UDP_BOUND + b"chatter", "proxy-protocol-error"),  # a control connection carries nothing
    ],
)
async def test_a_udp_associate_is_pipelined_and_gives_the_relay_address_or_fails_and_resets(reply, reason):
    with listener() as proxy:
        async with running_dialer() as dialer:
            async with trio.open_nursery() as nursery:

                async def play():
                    conn = await accept(proxy)
                    with conn:
                        assert await receive_exactly(conn, 13) == SOCKS5_GREETING + SOCKS5_UDP_ASSOCIATE
                        await conn.send(b"\x05\x00" + reply)
                        if reason is None:
                            await conn.recv(1)  # until the test is done with it
                        else:
                            await assert_reset(conn)

                nursery.start_soon(play)
                if reason is None:
                    sock, bound = await associate_through(dialer, proxy)
                    assert bound == ("127.0.0.1", 8080) and dialer.pipelining == {SOCKS5: True}
                    sock.close()
                else:
                    with pytest.raises(UpstreamError) as raised:
                        await associate_through(dialer, proxy)
                    assert raised.value.reason == reason


@pytest.mark.parametrize("mark", [0x10, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_any_32_bit_mark_is_applied(mark):
    """Python's setsockopt() takes an int only below 2**31; marks with the top bit set are common."""
    require_root("SO_MARK needs CAP_NET_ADMIN")
    with socket.socket() as sock:
        apply_mark(sock, mark)
        assert struct.unpack("=I", sock.getsockopt(socket.SOL_SOCKET, SO_MARK, 4))[0] == mark
