"""The splice engine and its pure twin, driven by hand over real loopback TCP connections.

Time is whatever the test passes as ``now``: nothing here waits for a timeout.
"""

import errno
import gc
import hashlib
import os
import select
import socket
import tempfile
import threading
import time
from fractions import Fraction

import pytest

from tests.sockpairs import hard_close, tcp_pair

IDLE, HALF_CLOSED = 600.0, 60.0


@pytest.fixture
def engine(impl):
    engine = impl.Engine()
    yield engine
    engine.close()


def relayed(engine, token, now=0.0, idle=IDLE, half_closed=HALF_CLOSED, **options):
    """app_client <-> [engine] <-> app_server; returns the two application ends (blocking, 10 s timeout)."""
    app_client, relay_client = tcp_pair()
    relay_upstream, app_server = tcp_pair()
    relay_client.setblocking(False)
    relay_upstream.setblocking(False)
    engine.add(relay_client.detach(), relay_upstream.detach(), token, now, idle, half_closed, **options)
    for sock in (app_client, app_server):
        sock.settimeout(10)
    return app_client, app_server


def run(engine, until=lambda finished: False, now=0.0, seconds=1.0, budget=1 << 20):
    """Run the engine for ``seconds`` or until ``until(finished so far)``; returns what finished."""
    finished = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until(finished):
        if not engine.backlogged:
            select.select([engine], [], [], 0.02)
        finished += engine.run(now, budget)
    return finished


def count_of(n):
    return lambda finished: len(finished) >= n


def read_to_eof(sock) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def in_thread(function, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function(*args)), daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def send_then_fin(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return True


def send_until_reset(sock, data):
    try:
        sock.sendall(data)
    except ConnectionResetError:
        pass


def assert_reset(sock):
    with pytest.raises(OSError) as caught:
        while sock.recv(65536):
            pass
    assert caught.value.errno == errno.ECONNRESET


def test_both_twins_offer_the_same_engine_api(impl):
    engine = impl.Engine()
    assert isinstance(engine.fileno(), int) and len(engine) == 0 and not engine.backlogged
    assert engine.run(0.0, 1) == [] and engine.expire(0.0) == [] and engine.next_deadline == float("inf")
    assert engine.take_held() == [] and engine.release(12345, 0.0) == [] and engine.abort(12345, "x") == []
    assert engine.reclaim("reclaimed") == [] and engine.close() == []


def test_the_engine_s_attributes_are_read_only(engine):
    for name, value in [("next_deadline", 0.0), ("moved", 1), ("backlogged", True), ("anything_else", 1)]:
        with pytest.raises(AttributeError):
            setattr(engine, name, value)


@pytest.mark.parametrize(
    "call",
    [
        lambda engine: engine.run("0", 1),  # a time is a number, never a string
        lambda engine: engine.run(0.0, 1.5),  # a budget is a count of bytes
        lambda engine: engine.expire(None),
        lambda engine: engine.release("1", 0.0),
        lambda engine: engine.abort(1, None),
        lambda engine: engine.abort(1, b"upstream-down"),
        lambda engine: engine.reclaim(None),
        lambda engine: engine.add("3", 4, "t", 0.0, 1.0, 1.0),
        lambda engine: engine.add(3, 4, "t", 0.0, 1.0, 1.0, to_upstream_first=bytearray(b"x")),
        lambda engine: type(engine)("an argument"),
    ],
)
def test_both_twins_refuse_the_same_arguments(engine, call):
    with pytest.raises(TypeError):
        call(engine)


@pytest.mark.parametrize(
    "call",
    [
        lambda engine: engine.run(0.0, 1 << 63),
        lambda engine: engine.release(1 << 63, 0.0),
        lambda engine: engine.add(1 << 40, 4, "t", 0.0, 1.0, 1.0),
    ],
)
def test_both_twins_refuse_the_same_out_of_range_integers(engine, call):
    with pytest.raises(OverflowError):
        call(engine)


def test_both_twins_convert_arguments_alike(engine):
    assert engine.run(0, True) == [] and engine.expire(Fraction(1, 2)) == []
    assert engine.release(1.0, 0) == [] and engine.abort(True, "x") == []  # C integers: floats are truncated
    app_client, app_server = relayed(engine, "t", now=1, idle=Fraction(30), to_upstream_first=None, hold_upstream_eof=1)
    assert engine.next_deadline == 31.0 and isinstance(engine.next_deadline, float)
    app_server.shutdown(socket.SHUT_WR)
    run(engine, seconds=0.2)
    assert [token for _, token in engine.take_held()] == ["t"]


def test_an_engine_dropped_unclosed_closes_its_connections(impl):
    """As close() was not called, nobody is told, and nobody is reset: but no fd is left open."""
    engine = impl.Engine()
    epoll_fd = engine.fileno()
    app_client, app_server = relayed(engine, "t")
    del engine
    gc.collect()
    assert read_to_eof(app_client) == b"" and read_to_eof(app_server) == b""
    with pytest.raises(OSError):
        os.fstat(epoll_fd)


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 << 20])
def test_sizes_arrive_intact_both_ways(engine, size):
    app_client, app_server = relayed(engine, "t")
    up, down = os.urandom(size), os.urandom(size)
    senders = [in_thread(send_then_fin, app_client, up), in_thread(send_then_fin, app_server, down)]
    readers = [in_thread(read_to_eof, app_server), in_thread(read_to_eof, app_client)]
    assert run(engine, count_of(1), seconds=30) == [("t", "closed", size, size)]
    for worker in senders + readers:
        worker["thread"].join(10)
    assert readers[0]["value"] == up and readers[1]["value"] == down
    assert len(engine) == 0


def test_large_transfer_through_a_larger_pipe(engine):
    app_client, app_server = relayed(engine, "t", pipe_size=1 << 20)
    data = os.urandom(64 << 20)
    in_thread(send_then_fin, app_client, data)
    app_server.shutdown(socket.SHUT_WR)
    reader = in_thread(read_to_eof, app_server)
    assert run(engine, count_of(1), seconds=60) == [("t", "closed", len(data), 0)]
    reader["thread"].join(10)
    assert hashlib.sha256(reader["value"]).digest() == hashlib.sha256(data).digest()


def test_many_connections_at_once(engine):
    ends = {f"conn-{i}": relayed(engine, f"conn-{i}") for i in range(60)}
    for token, (app_client, app_server) in ends.items():
        app_client.sendall(f"up from {token}".encode())
        app_server.sendall(f"down to {token}".encode() * 3)
        app_client.shutdown(socket.SHUT_WR)
        app_server.shutdown(socket.SHUT_WR)
    finished = run(engine, count_of(len(ends)), seconds=20)
    assert sorted(finished) == sorted(
        (token, "closed", len(f"up from {token}"), 3 * len(f"down to {token}")) for token in ends
    )
    for token, (app_client, app_server) in ends.items():
        assert read_to_eof(app_server) == f"up from {token}".encode()
        assert read_to_eof(app_client) == f"down to {token}".encode() * 3


def test_early_bytes_go_first_and_count(engine):
    app_client, app_server = relayed(engine, "t", to_upstream_first=b"sniffed ", to_client_first=b"banner ")
    app_client.sendall(b"request")
    app_server.sendall(b"reply")
    app_client.shutdown(socket.SHUT_WR)
    app_server.shutdown(socket.SHUT_WR)
    assert run(engine, count_of(1), seconds=10) == [("t", "closed", 15, 12)]
    assert read_to_eof(app_server) == b"sniffed request"
    assert read_to_eof(app_client) == b"banner reply"


@pytest.mark.parametrize("first_to_finish", ["client", "server"])
def test_half_close_keeps_the_other_direction(engine, first_to_finish):
    app_client, app_server = relayed(engine, "t")
    quitter, stayer = (app_client, app_server) if first_to_finish == "client" else (app_server, app_client)
    send_then_fin(quitter, b"request, then FIN")
    assert run(engine, seconds=0.3) == []
    assert read_to_eof(stayer) == b"request, then FIN"  # the FIN arrived as EOF...
    assert len(engine) == 1
    late = os.urandom(1 << 20)
    sender = in_thread(send_then_fin, stayer, late)  # ...and the other way still works
    reader = in_thread(read_to_eof, quitter)
    sent_up, sent_down = (17, len(late)) if first_to_finish == "client" else (len(late), 17)
    assert run(engine, count_of(1), seconds=20) == [("t", "closed", sent_up, sent_down)]
    sender["thread"].join(10)
    reader["thread"].join(10)
    assert reader["value"] == late


@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_resets_both(engine, who):
    app_client, app_server = relayed(engine, "t")
    culprit, victim = (app_client, app_server) if who == "client" else (app_server, app_client)
    culprit.sendall(b"some bytes before the crash")
    assert run(engine, seconds=0.2) == []
    hard_close(culprit)
    [(token, ended, _, _)] = run(engine, count_of(1), seconds=10)
    assert ended == ("client-reset" if who == "client" else "upstream-reset")
    assert victim.recv(100) == b"some bytes before the crash"
    assert_reset(victim)


def test_idle_timeout_resets_both(engine):
    app_client, app_server = relayed(engine, "t", now=100.0, idle=30.0)
    assert engine.next_deadline == 130.0
    assert engine.expire(129.0) == [] and engine.next_deadline == 130.0
    assert engine.expire(130.0) == [("t", "idle-timeout", 0, 0)] and engine.next_deadline == float("inf")
    assert len(engine) == 0
    assert_reset(app_client)
    assert_reset(app_server)


def test_reclaim_takes_the_idlest_connection_whose_client_never_spoke(engine):
    spoke_client, spoke_server = relayed(engine, "spoke", now=0.0)
    spoke_client.sendall(b"hello")
    run(engine, now=1.0, seconds=0.2)
    assert spoke_server.recv(10) == b"hello"
    early = relayed(engine, "early bytes", now=0.0, to_upstream_first=b"sniffed")
    newer = relayed(engine, "silent, newer", now=5.0)
    older_client, older_server = relayed(engine, "silent, server spoke", now=2.0)
    older_server.sendall(b"banner")  # the server speaking keeps it active, but its client is still silent
    run(engine, now=3.0, seconds=0.2)
    assert older_client.recv(10) == b"banner" and early[1].recv(10) == b"sniffed"
    assert engine.reclaim("reclaimed") == [("silent, server spoke", "reclaimed", 0, 6)]
    assert_reset(older_client)
    assert engine.reclaim("reclaimed") == [("silent, newer", "reclaimed", 0, 0)]
    assert_reset(newer[0])
    assert engine.reclaim("reclaimed") == []  # every client left has spoken
    assert len(engine) == 2


def test_counts_give_each_live_connection_its_bytes_so_far(engine):
    assert engine.counts() == []
    first = relayed(engine, "first", to_upstream_first=b"sniffed")
    second = relayed(engine, "second")
    first[0].sendall(b"12345")
    second[1].sendall(b"abc")
    run(engine, now=1.0, seconds=0.2)
    assert first[1].recv(20) == b"sniffed12345" and second[0].recv(10) == b"abc"
    assert sorted(engine.counts()) == [("first", 12, 0), ("second", 0, 3)]
    first[0].close()
    first[1].close()
    run(engine, now=2.0, seconds=0.2)
    assert engine.counts() == [("second", 0, 3)]


def test_traffic_postpones_the_idle_timeout(engine):
    app_client, app_server = relayed(engine, "t", now=0.0, idle=30.0)
    app_client.sendall(b"ping")
    run(engine, now=20.0, seconds=0.2)
    assert app_server.recv(10) == b"ping"
    assert engine.expire(30.0) == [] and engine.next_deadline == 50.0


def test_half_closed_timeout_once_one_direction_is_done(engine):
    app_client, app_server = relayed(engine, "t", now=0.0, idle=30.0, half_closed=5.0)
    app_client.shutdown(socket.SHUT_WR)
    run(engine, now=10.0, seconds=0.2)
    assert read_to_eof(app_server) == b""
    assert engine.next_deadline == 15.0  # earlier than the idle timeout: whoever waits must know
    assert engine.expire(14.0) == [] and engine.next_deadline == 15.0
    assert engine.expire(15.0) == [("t", "half-closed-timeout", 0, 0)]
    assert_reset(app_client)


def test_timeouts_are_per_connection(engine):
    relayed(engine, "short", idle=10.0)
    relayed(engine, "long", idle=100.0)
    assert engine.next_deadline == 10.0
    assert [token for token, *_ in engine.expire(10.0)] == ["short"] and engine.next_deadline == 100.0


def test_slow_reader_stalls_the_sender(engine, impl):
    app_client, app_server = relayed(engine, "t")
    data = os.urandom(32 << 20)  # far more than the socket buffers and the pipe hold together
    sender = in_thread(send_then_fin, app_client, data)
    run(engine, seconds=1.0)
    assert sender["thread"].is_alive(), "the relay took everything although nobody read it"
    assert run(engine, seconds=0.2) == [] and not engine.backlogged  # stalled, not spinning
    reader = in_thread(read_to_eof, app_server)
    app_server.shutdown(socket.SHUT_WR)
    assert run(engine, count_of(1), seconds=60) == [("t", "closed", len(data), 0)]
    reader["thread"].join(10)
    assert hashlib.sha256(reader["value"]).digest() == hashlib.sha256(data).digest()


def test_a_small_budget_takes_turns_without_losing_bytes(engine):
    ends = [relayed(engine, i) for i in range(3)]
    payloads = [os.urandom(1 << 20) for _ in ends]
    readers = []
    for (app_client, app_server), data in zip(ends, payloads):
        in_thread(send_then_fin, app_client, data)
        app_server.shutdown(socket.SHUT_WR)
        readers.append(in_thread(read_to_eof, app_server))
    finished = run(engine, count_of(3), seconds=60, budget=4096)
    assert sorted(finished) == [(i, "closed", 1 << 20, 0) for i in range(3)]
    for reader, data in zip(readers, payloads):
        reader["thread"].join(10)
        assert reader["value"] == data


def test_idle_connections_hold_no_pipes(engine, impl):
    app_client, app_server = relayed(engine, "t")
    before = impl.pooled_pipes()
    app_client.sendall(b"x" * 100_000)
    run(engine, seconds=0.3)
    assert len(read_exactly(app_server, 100_000)) == 100_000
    run(engine, seconds=0.1)
    assert impl.pooled_pipes() == max(before, 1)  # the one it used is back in the pool


def held_until_released(engine):
    """One connection whose upstream sent bytes and a FIN, held: (handle, app_client, app_server)."""
    app_client, app_server = relayed(engine, "t", hold_upstream_eof=True)
    send_then_fin(app_server, b"the last reply")
    assert run(engine, seconds=0.3) == []
    assert read_exactly(app_client, 14) == b"the last reply"  # the bytes go on, the FIN waits
    [(handle, token)] = engine.take_held()
    assert token == "t" and engine.take_held() == []
    return handle, app_client, app_server


def test_a_held_upstream_fin_waits_for_release(engine):
    handle, app_client, app_server = held_until_released(engine)
    app_client.settimeout(0.2)
    with pytest.raises(TimeoutError):
        app_client.recv(1)
    app_client.sendall(b"the client still talks")  # the other direction is untouched
    run(engine, seconds=0.2)
    assert app_server.recv(100) == b"the client still talks"
    assert engine.release(handle, 1.0) == []
    app_client.settimeout(10)
    assert read_to_eof(app_client) == b""
    assert engine.next_deadline == 1.0 + HALF_CLOSED  # half-closed from the release on
    app_client.shutdown(socket.SHUT_WR)
    assert run(engine, count_of(1)) == [("t", "closed", 22, 14)]
    assert read_to_eof(app_server) == b""


def test_an_aborted_held_fin_resets_both_sides(engine):
    handle, app_client, app_server = held_until_released(engine)
    assert engine.abort(handle, "upstream-down") == [("t", "upstream-down", 0, 14)]
    assert len(engine) == 0
    assert_reset(app_client)
    assert engine.release(handle, 1.0) == [] and engine.abort(handle, "again") == []  # once only


def test_a_stale_handle_touches_nothing(engine):
    handle, app_client, app_server = held_until_released(engine)
    hard_close(app_client)
    assert run(engine, count_of(1)) == [("t", "client-reset", 0, 14)]
    successor_client, successor_server = relayed(engine, "successor", hold_upstream_eof=True)  # the same slot
    send_then_fin(successor_server, b"x")
    run(engine, seconds=0.2)
    assert engine.abort(handle, "upstream-down") == [] and engine.release(handle, 1.0) == []
    assert len(engine) == 1 and successor_client.recv(1) == b"x"


def test_a_held_fin_of_a_connection_that_expired_is_not_reported(engine):
    app_client, app_server = relayed(engine, "t", now=0.0, idle=10.0, hold_upstream_eof=True)
    app_server.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    assert run(engine, now=10.0, seconds=0.2) == []
    assert engine.expire(10.0) == [("t", "idle-timeout", 0, 0)]
    assert engine.take_held() == []


def test_only_the_upstream_fin_is_held(engine):
    app_client, app_server = relayed(engine, "t", hold_upstream_eof=True)
    send_then_fin(app_client, b"request")
    run(engine, seconds=0.2)
    assert read_to_eof(app_server) == b"request" and engine.take_held() == []


def test_without_holding_nothing_is_held(engine):
    app_client, app_server = relayed(engine, "t")
    send_then_fin(app_server, b"reply")
    run(engine, seconds=0.2)
    assert read_to_eof(app_client) == b"reply" and engine.take_held() == []


def read_exactly(sock, size):
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


def test_close_resets_everything_left(impl):
    engine = impl.Engine()
    ends = [relayed(engine, i) for i in range(3)]
    ends[0][0].sendall(b"in flight")
    run(engine, seconds=0.1)
    assert sorted(engine.close()) == [(0, "cancelled", 9, 0), (1, "cancelled", 0, 0), (2, "cancelled", 0, 0)]
    assert len(engine) == 0 and engine.close() == []
    for app_client, _ in ends:
        assert_reset(app_client)


def test_a_pipe_with_bytes_left_is_not_pooled(impl):
    engine = impl.Engine()
    app_client, app_server = relayed(engine, "t")
    in_thread(send_until_reset, app_client, os.urandom(32 << 20))  # nobody reads: the pipe fills up, stays full
    run(engine, seconds=0.5)
    holding = impl.pooled_pipes()
    assert engine.close() == [("t", "cancelled", ANY_COUNT, 0)]
    assert impl.pooled_pipes() == holding  # dropped, not given back with stale bytes in it


def test_the_pool_keeps_at_most_pool_max_pipes(impl):
    """More connections than POOL_MAX hold a pipe at once (their upstream reads nothing); when they all end,
    POOL_MAX pipes wait in the pool and the rest are closed."""
    engine = impl.Engine()
    ends = []
    for token in range(impl.POOL_MAX + 8):
        app_client, relay_client = tcp_pair()
        relay_upstream, app_server = tcp_pair(buffer_size=4096)
        relay_client.setblocking(False)
        relay_upstream.setblocking(False)
        engine.add(relay_client.detach(), relay_upstream.detach(), token, 0.0, IDLE, HALF_CLOSED)
        app_client.setblocking(False)
        app_client.send(bytes(256 << 10))  # what fits: more than the upstream side takes
        app_client.shutdown(socket.SHUT_WR)
        app_server.settimeout(10)
        ends.append(app_server)
    run(engine, seconds=0.5)
    assert impl.pooled_pipes() == 0  # every connection holds one

    def drain_each():
        for app_server in ends:
            read_to_eof(app_server)
            app_server.shutdown(socket.SHUT_WR)

    in_thread(drain_each)
    finished = run(engine, count_of(len(ends)), seconds=30)
    assert sorted(ended for _, ended, _, _ in finished) == ["closed"] * len(ends)
    assert impl.pooled_pipes() == impl.POOL_MAX
    engine.close()


class _AnyCount:
    def __eq__(self, other):
        return isinstance(other, int) and other >= 0


ANY_COUNT = _AnyCount()


def test_moved_counts_the_bytes_of_the_last_run(engine):
    app_client, app_server = relayed(engine, "t")
    data = os.urandom(200_000)
    app_client.sendall(data[:1000])
    moved = []
    deadline = time.monotonic() + 10
    while sum(moved) < 1000 and time.monotonic() < deadline:
        select.select([engine], [], [], 0.02)
        engine.run(0.0, 1 << 20)
        moved.append(engine.moved)
    assert sum(moved) == 1000  # each run reports its own bytes, not a running total
    assert app_server.recv(2000) == data[:1000]
    engine.run(0.0, 1 << 20)
    assert engine.moved == 0  # nothing was ready


def test_a_failed_add_leaves_the_engine_usable(impl):
    """add() of an fd epoll refuses raises OSError (the caller resets and goes on): the slot made for it stays free."""
    engine = impl.Engine()
    with tempfile.TemporaryFile() as regular:  # epoll refuses regular files: EPERM
        with pytest.raises(OSError):
            engine.add(regular.fileno(), regular.fileno(), "bad", 0.0, 10.0, 5.0)
    assert engine.counts() == [] and engine.expire(100.0) == [] and engine.reclaim("reclaimed") == []
    assert engine.close() == []


@pytest.mark.parametrize("inline", [True, False], ids=["oobinline", "urgent-left-out"])
@pytest.mark.parametrize("upstream_sends", [False, True], ids=["client-sends", "upstream-sends"])
def test_bytes_after_an_urgent_byte_are_relayed_and_the_end_after_them(impl, inline, upstream_sends):
    """splice() stops at an urgent (MSG_OOB) byte for good: the engine reads past it, with the byte in place
    when the source has SO_OOBINLINE (as the relay's sockets have), rather than stall or end the stream there."""
    engine = impl.Engine()
    app_client, relay_client = tcp_pair()
    relay_upstream, app_server = tcp_pair()
    for sock in (relay_client, relay_upstream):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, int(inline))
    engine.add(relay_client.detach(), relay_upstream.detach(), "t", 0.0, IDLE, HALF_CLOSED)
    sender, receiver = (app_server, app_client) if upstream_sends else (app_client, app_server)
    receiver.settimeout(10)
    sender.send(b"abc!", socket.MSG_OOB)
    sender.sendall(b"def")
    run(engine, seconds=0.3)  # no FIN yet: what follows the mark must not wait for one
    expected = b"abc!def" if inline else b"abcdef"
    assert read_exactly(receiver, len(expected)) == expected
    sender.shutdown(socket.SHUT_WR)
    receiver.shutdown(socket.SHUT_WR)
    moved = (0, len(expected)) if upstream_sends else (len(expected), 0)
    assert run(engine, count_of(1), seconds=5) == [("t", "closed", *moved)]
    assert read_to_eof(receiver) == b""
    engine.close()
    app_client.close()
    app_server.close()
