"""The Preconnector against real loopback sockets: pools sized and refilled, stale connections never
handed out, a dead proxy not hammered, and the Dialer starting again when a pooled one was stale."""

import socket
import time

import pytest
import trio

from relay.config import Upstream
from relay.net import preconnect
from relay.net.dial import Dialer
from relay.net.preconnect import AUTO_MAX, Preconnector
from tests.net.test_dial import (
    SOCKS5_GREETING,
    SOCKS5_REQUEST,
    SOCKS5_SUCCESS,
    closed_port,
    listener,
    open_through,
    receive_exactly,
)

HTTP = Upstream("http", "127.0.0.1", 1)
SOCKS5 = Upstream("socks5", "127.0.0.1", 1)


class Counts:
    def __init__(self):
        self.seen: dict[str, int] = {}

    def preconnect(self, outcome):
        self.seen[outcome] = self.seen.get(outcome, 0) + 1


def accepted(proxy: socket.socket) -> list[socket.socket]:
    """Every connection waiting in the listener's backlog."""
    proxy.setblocking(False)
    conns = []
    while True:
        try:
            conns.append(proxy.accept()[0])
        except BlockingIOError:
            return conns


async def wait_for(condition, seconds=5.0):
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


async def first_client(pre, address, upstream=HTTP, ready=1):
    """A client arrives (and misses); returns the pool once it holds ``ready`` connections."""
    assert pre.take(upstream, socket.AF_INET, address, None) is None
    pool = pre.pools[(upstream, socket.AF_INET, address, None)]
    await wait_for(lambda: len(pool.ready) == ready)
    return pool


@pytest.fixture
async def running():
    """run(size) -> a running Preconnector, stopped (its sockets closed) at the end."""
    async with trio.open_nursery() as nursery:
        made = []

        def run(size, connect_timeout=2.0):
            pre = Preconnector(size, connect_timeout, Counts())
            made.append(pre)
            nursery.start_soon(pre.run)
            return pre

        yield run
        nursery.cancel_scope.cancel()
    for pre in made:
        assert pre.pools == {}  # run() closes what it holds when it ends


async def test_the_first_client_misses_and_the_next_gets_a_connection_made_ahead(running):
    with listener() as proxy:
        pre = running(None)
        address = proxy.getsockname()
        pool = await first_client(pre, address)
        sock, lent_from, opened = pre.take(HTTP, socket.AF_INET, address, None)
        assert lent_from is pool and opened <= time.monotonic()
        assert len(pool.ready) == 1  # its replacement, opened as it was taken
        [conn] = [conn for conn in accepted(proxy) if conn.getpeername() == sock.getsockname()]
        with sock, conn:
            assert sock.getpeername() == conn.getsockname()
            sock.sendall(b"CONNECT")
            assert conn.recv(10) == b"CONNECT"
        assert pre.metrics.seen == {"missed": 1, "taken": 1}


async def test_a_fixed_size_is_kept_and_off_holds_nothing(running):
    with listener(backlog=16) as proxy:
        address = proxy.getsockname()
        fixed = running(3)
        pool = await first_client(fixed, address, ready=3)
        await trio.sleep(preconnect.SWEEP_INTERVAL * 1.5)
        held = accepted(proxy)  # kept open: closing them would make the pool replace them
        assert len(pool.ready) == 3 and len(held) == 3
        off = running(0)
        assert off.take(HTTP, socket.AF_INET, address, None) is None
        await trio.sleep(preconnect.SWEEP_INTERVAL * 1.5)
        assert off.pools == {} and accepted(proxy) == []
        for conn in held:
            conn.close()


async def test_auto_follows_the_busiest_recent_second_up_to_its_bound(running):
    with listener(backlog=64) as proxy:
        address = proxy.getsockname()
        pre = running(None)
        for _ in range(3):
            pre.take(HTTP, socket.AF_INET, address, None)
        pool = pre.pools[(HTTP, socket.AF_INET, address, None)]
        assert pre.target(pool, time.monotonic()) == 3
        for _ in range(50):
            pre.take(HTTP, socket.AF_INET, address, None)
        assert pre.target(pool, time.monotonic()) == AUTO_MAX
        await wait_for(lambda: len(pool.ready) == AUTO_MAX)
        # Clients stopped coming: the pool goes cold and its connections are closed.
        assert pre.target(pool, time.monotonic() + preconnect.KEEP_WARM + 1) == 0


async def test_a_connection_the_proxy_closed_is_never_handed_out_and_teaches_a_shorter_age(running, monkeypatch):
    monkeypatch.setattr(preconnect, "SWEEP_INTERVAL", 60.0)  # only take() looks at them here
    with listener() as proxy:
        address = proxy.getsockname()
        pre = running(1)
        pool = await first_client(pre, address, SOCKS5)
        [conn] = accepted(proxy)
        conn.close()  # the proxy's negotiation timeout, say
        await trio.sleep(0.05)
        assert pre.take(SOCKS5, socket.AF_INET, address, None) is None
        assert pre.metrics.seen["closed"] == 1 and pool.max_age < preconnect.MAX_AGE


@pytest.mark.parametrize("how", ["fin", "reset", "unasked-bytes"])
async def test_the_sweep_drops_connections_the_proxy_ended(running, how):
    with listener() as proxy:
        address = proxy.getsockname()
        pre = running(1)
        pool = await first_client(pre, address)
        [conn] = accepted(proxy)
        first = pool.ready[0][1]
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        elif how == "unasked-bytes":
            conn.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        conn.close()
        # Replaced by a live one at the next sweep.
        await wait_for(lambda: len(pool.ready) == 1 and pool.ready[0][1] is not first, preconnect.SWEEP_INTERVAL * 3)
        assert first.fileno() == -1 and pre.metrics.seen["closed"] == 1
        [replacement] = accepted(proxy)
        replacement.close()


async def test_connections_past_their_age_are_replaced(running, monkeypatch):
    monkeypatch.setattr(preconnect, "MAX_AGE", 0.3)
    with listener() as proxy:
        address = proxy.getsockname()
        pre = running(1)
        pool = await first_client(pre, address)
        first = pool.ready[0][1]
        await wait_for(lambda: len(pool.ready) == 1 and pool.ready[0][1] is not first, preconnect.SWEEP_INTERVAL * 3)
        assert pre.metrics.seen["aged"] >= 1 and first.fileno() == -1


async def test_a_dead_proxy_is_tried_again_with_backoff_not_in_a_loop(running, monkeypatch):
    attempts = []
    real_new_socket = preconnect.new_socket

    def counting_new_socket(*args):
        attempts.append(time.monotonic())
        return real_new_socket(*args)

    monkeypatch.setattr(preconnect, "new_socket", counting_new_socket)
    address = closed_port()
    pre = running(2)
    assert pre.take(HTTP, socket.AF_INET, address, None) is None
    await trio.sleep(2.5)
    # A round of two (the size) at the first sweep, refused; the next round no sooner than 1 s later.
    rounds = [attempts[0]] + [at for before, at in zip(attempts, attempts[1:]) if at - before > 0.5]
    assert len(rounds) <= 2 and len(attempts) <= 4, attempts
    assert all(later - earlier >= 0.9 for earlier, later in zip(rounds, rounds[1:])), attempts
    assert not pre.pools[(HTTP, socket.AF_INET, address, None)].ready


def stale_pool(proxy: socket.socket, upstream: Upstream, monkeypatch):
    """A Preconnector (not running, and refilling nothing behind the test's back) whose one pooled
    connection to ``proxy`` the proxy has closed; returns it, the pool's key and the pooled socket."""
    address = proxy.getsockname()
    pre = Preconnector(1, 2.0, Counts())
    monkeypatch.setattr(pre, "_refill", lambda pool, now: False)
    key = (upstream, socket.AF_INET, address, None)
    pooled = socket.create_connection(address)
    pooled.setblocking(False)
    [stale] = accepted(proxy)
    stale.close()
    pre.pools[key] = preconnect.Pool(key)
    pre.pools[key].ready.append((time.monotonic(), pooled))
    return pre, key, pooled


async def test_the_dialer_starts_again_on_a_new_connection_when_the_pooled_one_was_stale(monkeypatch):
    """The proxy closed the pooled connection just after it was taken: the client still gets its tunnel."""
    monkeypatch.setattr(preconnect, "readable_now", lambda sock: False)  # the close comes too late to see
    with listener() as proxy:
        address = proxy.getsockname()
        pre, key, pooled = stale_pool(proxy, SOCKS5, monkeypatch)
        dialer = Dialer(pre)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dialer.run)
            outcome = open_through(dialer, SOCKS5, [(socket.AF_INET, address)])
            await wait_for(lambda: pooled.fileno() == -1)  # tried, found closed, reset
            [conn] = accepted(proxy)
            with trio.socket.from_stdlib_socket(conn) as fresh:
                assert await receive_exactly(fresh, 13) == SOCKS5_GREETING + SOCKS5_REQUEST
                await fresh.send(b"\x05\x00" + SOCKS5_SUCCESS)
                kind, sock, _ = await outcome.wait()
                sock.close()
            assert kind == "opened" and pre.metrics.seen == {"taken": 1, "closed": 1}
            assert pre.pools[key].max_age < preconnect.MAX_AGE  # taught by the stale one
            dialer.close()


async def test_a_dial_started_again_after_a_stale_pooled_connection_sends_the_same_early_data(monkeypatch):
    """HTTP CONNECT with a ClientHello after it, on a pooled connection the proxy had closed: the fresh
    connection gets the request and the same early bytes (the caller counts on them having gone)."""
    monkeypatch.setattr(preconnect, "readable_now", lambda sock: False)
    hello = b"\x16\x03\x01\x00\x05hello"
    with listener() as proxy:
        address = proxy.getsockname()
        pre, _, pooled = stale_pool(proxy, HTTP, monkeypatch)
        dialer = Dialer(pre)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dialer.run)
            outcome = open_through(dialer, HTTP, [(socket.AF_INET, address)], early_data=hello)
            await wait_for(lambda: pooled.fileno() == -1)
            [conn] = accepted(proxy)
            request = b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\nConnection: close\r\n\r\n"
            with trio.socket.from_stdlib_socket(conn) as fresh:
                assert await receive_exactly(fresh, len(request) + len(hello)) == request + hello
                await fresh.send(b"HTTP/1.1 200 OK\r\n\r\n")
                kind, sock, _ = await outcome.wait()
                sock.close()
            assert kind == "opened" and pre.metrics.seen == {"taken": 1, "closed": 1}
            dialer.close()


async def test_keep_alive_connections_clients_left_are_bounded_and_never_handed_out_closed(running, monkeypatch):
    with listener(backlog=32) as proxy:
        address = proxy.getsockname()
        pre = running(0)
        pre.size = 1  # a pool for this address, but nothing opened ahead
        monkeypatch.setattr(pre, "_refill", lambda pool, now: False)
        assert pre.take(HTTP, socket.AF_INET, address, None) is None
        left = [socket.create_connection(address) for _ in range(preconnect.KEPT_MAX + 1)]
        kept = [pre.keep(HTTP, socket.AF_INET, address, None, sock) for sock in left]
        assert kept == [True] * preconnect.KEPT_MAX + [False]  # the caller closes the one too many
        left[-1].close()
        ends = accepted(proxy)
        ends[-2].close()  # the proxy closed the newest kept one
        await trio.sleep(0.05)
        newest_alive = pre.take_kept(HTTP, socket.AF_INET, address, None)
        assert newest_alive is left[-3] and left[-2].fileno() == -1
        assert pre.metrics.seen["kept"] == preconnect.KEPT_MAX and pre.metrics.seen["reused"] == 1
        monkeypatch.setattr(preconnect, "KEPT_MAX_AGE", 0.0)
        assert pre.take_kept(HTTP, socket.AF_INET, address, None) is None  # the rest too old: closed
        assert all(sock.fileno() == -1 for sock in left[:-3])
        newest_alive.close()
        for end in ends:
            end.close()


async def test_a_reload_closes_the_pools_of_upstreams_it_removed(running):
    with listener() as proxy:
        address = proxy.getsockname()
        pre = running(1)
        pool = await first_client(pre, address)
        [pooled] = [sock for _, sock in pool.ready]
        other = Upstream("http", "127.0.0.2", 3128)
        pre.configure(1, 2.0, [other])
        assert pre.pools == {} and pooled.fileno() == -1
        for conn in accepted(proxy):
            conn.close()
