"""The fast path and its pure twin, over real TCP sockets, with the same tests."""

import errno
import hashlib
import os
import select
import socket
import threading
import time

import pytest

from relay import _fastpath_py, fastpath
from relay._fastpath_common import AGAIN, EOF, WANT_READ, WANT_WRITE, FlowError
from tests.sockpairs import hard_close, tcp_pair

BUDGET = 1 << 20


@pytest.fixture
def link():
    """src_peer -> src ==Flow==> dst -> dst_peer, src and dst non-blocking."""
    src_peer, src = tcp_pair()
    dst, dst_peer = tcp_pair()
    src.setblocking(False)
    dst.setblocking(False)
    yield src_peer, src, dst, dst_peer
    for s in (src_peer, src, dst, dst_peer):
        s.close()


def drive(flow, src, dst, timeout=30.0, budget=BUDGET):
    """Step until EOF, waiting for exactly the readiness each step asks for. Returns bytes moved."""
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        status, moved = flow.step(src.fileno(), dst.fileno(), budget)
        total += moved
        if status == EOF:
            assert flow.pending == 0
            return total
        assert time.monotonic() < deadline, "flow did not finish in time"
        if status == WANT_READ:
            select.select([src], [], [], 1.0)
        elif status == WANT_WRITE:
            assert flow.pending > 0
            select.select([], [dst], [], 1.0)
        else:
            assert status == AGAIN


def feed(sock, data, chunk=65536, close=True):
    def run():
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def drain(sock, delay=0.0, chunk=65536):
    """Read to EOF in a thread, optionally pausing between reads; returns a dict filled at the end."""
    result = {}

    def run():
        digest, count = hashlib.sha256(), 0
        while True:
            data = sock.recv(chunk)
            if not data:
                break
            digest.update(data)
            count += len(data)
            if delay:
                time.sleep(delay)
        result["sha256"], result["count"] = digest.hexdigest(), count

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def test_selected_implementation_matches_environment():
    forced = os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0")
    if forced:
        assert fastpath.impl is _fastpath_py
    assert fastpath.NAME in ("cython", "python")


def test_both_twins_offer_the_same_api(impl):
    for name in ("NAME", "Flow", "original_dst", "set_transparent"):
        assert hasattr(impl, name)
    flow = impl.Flow()
    assert (flow.pending, flow.eof) == (0, False)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20])
def test_edge_sizes_arrive_intact(impl, link, size):
    src_peer, src, dst, dst_peer = link
    data = os.urandom(size)
    feeder = feed(src_peer, data)
    sink = drain(dst_peer)
    flow = impl.Flow()
    assert drive(flow, src, dst) == size
    dst.shutdown(socket.SHUT_WR)
    feeder.join(5)
    sink["thread"].join(5)
    assert sink["count"] == size
    assert sink["sha256"] == hashlib.sha256(data).hexdigest()
    flow.close()


def test_large_transfer(impl, link):
    src_peer, src, dst, dst_peer = link
    data = os.urandom(64 << 20)
    feed(src_peer, data)
    sink = drain(dst_peer)
    flow = impl.Flow(pipe_size=1 << 20)
    assert drive(flow, src, dst, timeout=60) == len(data)
    dst.shutdown(socket.SHUT_WR)
    sink["thread"].join(30)
    assert sink["sha256"] == hashlib.sha256(data).hexdigest()


def test_eof_waits_until_buffered_bytes_are_written(impl, link):
    """The source has sent FIN while bytes still sit in the pipe: EOF only once they are out."""
    src_peer, src, dst, dst_peer = link
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(300_000)
    feeder = feed(src_peer, data)
    feeder.join(10)
    assert not feeder.is_alive(), "the source could not send everything before the relay read"
    flow = impl.Flow()
    for _ in range(100):
        status, _ = flow.step(src.fileno(), dst.fileno(), BUDGET)
        if status == WANT_WRITE:
            break
        select.select([src], [], [], 1.0)
    assert status == WANT_WRITE and flow.pending > 0 and not flow.eof
    sink = drain(dst_peer)
    drive(flow, src, dst)
    assert flow.eof
    dst.shutdown(socket.SHUT_WR)
    sink["thread"].join(10)
    assert sink["sha256"] == hashlib.sha256(data).hexdigest()


def test_slow_reader_gets_backpressure_not_buffering(impl, link):
    src_peer, src, dst, dst_peer = link
    data = os.urandom(2 << 20)
    feed(src_peer, data)
    sink = drain(dst_peer, delay=0.001, chunk=16384)
    flow = impl.Flow()
    peak = 0
    deadline = time.monotonic() + 60
    while True:
        status, _ = flow.step(src.fileno(), dst.fileno(), BUDGET)
        peak = max(peak, flow.pending)
        if status == EOF:
            break
        assert time.monotonic() < deadline
        select.select([src] if status == WANT_READ else [], [dst] if status == WANT_WRITE else [], [], 1.0)
    dst.shutdown(socket.SHUT_WR)
    sink["thread"].join(30)
    assert sink["sha256"] == hashlib.sha256(data).hexdigest()
    assert peak <= flow.capacity


def test_budget_yields_again(impl, link):
    src_peer, src, dst, dst_peer = link
    src_peer.sendall(os.urandom(200_000))
    time.sleep(0.05)
    sink = drain(dst_peer)
    flow = impl.Flow()
    status, moved = flow.step(src.fileno(), dst.fileno(), 1000)
    assert status in (AGAIN, WANT_WRITE)
    assert moved >= 1000 if status == AGAIN else moved > 0
    src_peer.shutdown(socket.SHUT_WR)
    assert moved + drive(flow, src, dst) == 200_000
    dst.close()
    sink["thread"].join(5)
    assert sink["count"] == 200_000


def test_nothing_to_read_wants_read(impl, link):
    _, src, dst, _ = link
    status, moved = impl.Flow().step(src.fileno(), dst.fileno(), BUDGET)
    assert (status, moved) == (WANT_READ, 0)


def test_source_reset_is_a_reading_error(impl, link):
    src_peer, src, dst, _ = link
    hard_close(src_peer)
    time.sleep(0.05)
    with pytest.raises(FlowError) as caught:
        impl.Flow().step(src.fileno(), dst.fileno(), BUDGET)
    assert caught.value.reading and caught.value.errno == errno.ECONNRESET


def test_destination_reset_is_a_writing_error(impl, link):
    src_peer, src, dst, dst_peer = link
    hard_close(dst_peer)
    time.sleep(0.05)
    src_peer.sendall(b"x" * 1000)
    time.sleep(0.05)
    flow = impl.Flow()
    with pytest.raises(FlowError) as caught:
        for _ in range(10):
            flow.step(src.fileno(), dst.fileno(), BUDGET)
            src_peer.sendall(b"x" * 1000)
            time.sleep(0.01)
    assert not caught.value.reading
    assert caught.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_close_is_idempotent_and_drops_buffered_bytes(impl, link):
    src_peer, src, dst, _ = link
    src_peer.sendall(b"abc")
    time.sleep(0.05)
    flow = impl.Flow()
    flow.step(src.fileno(), dst.fileno(), BUDGET)
    flow.close()
    flow.close()
    assert flow.pending == 0


def test_pipe_size_is_applied(impl, link):
    src_peer, src, dst, _ = link
    src_peer.sendall(b"x")
    flow = impl.Flow(pipe_size=1 << 18)
    flow.step(src.fileno(), dst.fileno(), BUDGET)
    assert flow.capacity == 1 << 18


def test_original_dst_without_nat_is_an_error(impl):
    """A connection that was not NATed has no original destination: both twins say ENOENT."""
    a, b = tcp_pair()
    with a, b:
        with pytest.raises(OSError) as caught:
            impl.original_dst(b)
        assert caught.value.errno == errno.ENOENT


def test_set_transparent(impl):
    with socket.socket() as sock:
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                impl.set_transparent(sock)
        else:
            impl.set_transparent(sock)
            assert sock.getsockopt(socket.IPPROTO_IP, 19) == 1  # IP_TRANSPARENT
    with socket.socket(socket.AF_INET6) as sock6:
        if os.geteuid() == 0:
            impl.set_transparent(sock6)
            assert sock6.getsockopt(socket.IPPROTO_IPV6, 75) == 1  # IPV6_TRANSPARENT


def test_empty_pipes_are_reused_and_dirty_ones_are_not(impl, link):
    src_peer, src, dst, dst_peer = link
    src_peer.sendall(b"abc")
    time.sleep(0.05)
    clean = impl.Flow()
    assert clean.step(src.fileno(), dst.fileno(), BUDGET) == (WANT_READ, 3)
    pooled = impl.pooled_pipes()
    clean.close()
    assert impl.pooled_pipes() == min(pooled + 1, 64)
    # A destination that is full for sure: a pipe, whose size never grows.
    full_r, full_w = os.pipe2(os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            while True:
                os.write(full_w, b"f" * 4096)
        src_peer.sendall(b"x" * 1000)
        time.sleep(0.05)
        dirty = impl.Flow()
        taken = impl.pooled_pipes()
        status, _ = dirty.step(src.fileno(), full_w, BUDGET)
        assert status == WANT_WRITE and dirty.pending == 1000
        assert impl.pooled_pipes() == taken - 1  # it took the pooled one...
        dirty.close()
        assert impl.pooled_pipes() == taken - 1  # ...and, with bytes in it, did not give it back
    finally:
        os.close(full_r)
        os.close(full_w)


def test_an_error_tells_how_many_bytes_the_step_wrote_before_it(impl, link):
    src_peer, src, dst, dst_peer = link
    src_peer.sendall(b"last words")
    hard_close(src_peer)
    time.sleep(0.05)
    with pytest.raises(FlowError) as caught:
        impl.Flow().step(src.fileno(), dst.fileno(), BUDGET)
    assert caught.value.reading and caught.value.moved == len(b"last words")
    assert dst_peer.recv(100) == b"last words"
