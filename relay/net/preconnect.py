"""Upstream connections opened before a client needs them.

Across a slow tunnel, a new connection's first round trip is the TCP connect to the proxy (through
``ssh -L``: the local connect is instant, but ssh must open a channel across the link before any
byte moves). The Preconnector keeps, per upstream address, a few connections already made, so a
new client's proxy handshake starts at once. How many follows the recent arrival rate (``auto``) or
is fixed (``--preconnect N``); a pool is kept only while clients come (KEEP_WARM), each connection
only until MAX_AGE (proxies close connections that never sent a request: dante after 30 s by
default), and one the proxy has closed (a FIN, a reset or bytes nobody asked for) is dropped, both
when it is taken and at every sweep. Proxies that close idle connections sooner teach their pool a
shorter age.
"""

from __future__ import annotations

import socket
import time
from collections import deque

import trio

from relay.logs import log
from relay.net.dial import connect_now, connected_at_once, new_socket
from relay.net.faults import UpstreamError
from relay.net.sockets import readable_now
from relay.net.tls import TlsSocket, closed_while_idle, secured

MAX_AGE = 20.0  # seconds a pooled connection is kept: below dante's default negotiate timeout (30 s)
KEPT_MAX = 8  # idle keep-alive connections kept per proxy address, after plain HTTP forwarded on them
KEPT_MAX_AGE = 30.0  # seconds one is kept idle: well below squid's client_idle_pconn_timeout (2 min)
MIN_AGE = 1.0  # the shortest age a proxy's closes may teach
KEEP_WARM = 300.0  # seconds after the last client that a pool is still refilled
RATE_WINDOW = 10.0  # seconds of arrivals the auto size is taken from
AUTO_MAX = 8  # the largest auto pool per upstream address
SWEEP_INTERVAL = 1.0
RETRY_AFTER = (1.0, 30.0)  # refill backoff after a failed connect: first, most


def closed_by_proxy(sock: socket.socket) -> bool:
    """Whether an idle pre-opened connection was ended by its proxy (or is otherwise unusable)."""
    return closed_while_idle(sock) if isinstance(sock, TlsSocket) else readable_now(sock)


class Pool:
    """The pre-opened connections to one upstream address, with its recent arrivals."""

    __slots__ = ("key", "ready", "kept", "arrivals", "last_arrival", "max_age", "retry_at", "backoff", "filling")

    def __init__(self, key) -> None:
        self.key = key  # (upstream, family, sockaddr, mark)
        self.ready: deque[tuple[float, socket.socket]] = deque()  # (opened at, socket), oldest first
        # Plain HTTP keep-alive connections a client left, idle at a message boundary: (since, socket).
        self.kept: deque[tuple[float, socket.socket]] = deque()
        # [second, clients in it] for the latest seconds that had any: the auto size is their busiest.
        self.arrivals: deque[list[int]] = deque(maxlen=int(RATE_WINDOW) + 1)
        self.last_arrival = 0.0
        self.max_age = MAX_AGE
        self.retry_at = 0.0
        self.backoff = 0.0
        self.filling = 0  # connects under way

    def close(self) -> None:
        for queue in (self.ready, self.kept):
            while queue:
                queue.popleft()[1].close()


class Preconnector:
    """Pools of connected sockets per upstream address, refilled by ``run()``; ``size`` is a fixed
    size, or None for auto (from the arrival rate), or 0 (off: ``take`` always misses)."""

    def __init__(self, size: int | None, connect_timeout: float, metrics=None) -> None:
        self.size = size
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.pools: dict[tuple, Pool] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None  # run()'s, for connects that must wait

    def configure(self, size: int | None, connect_timeout: float, upstreams) -> None:
        """A reload: the pools of upstreams no longer configured are closed, the next sweep sizes the
        others anew (off: empties them), and new upstreams get pools of their own."""
        self.size, self.connect_timeout = size, connect_timeout
        for key, pool in list(self.pools.items()):
            if key[0] not in upstreams:
                pool.close()
                del self.pools[key]
        self._wake.set()

    def take(self, upstream, family: int, address, mark: int | None) -> tuple[socket.socket, Pool, float] | None:
        """A connected socket to ``address`` for ``upstream``'s handshake, with its pool and when it was
        opened (for ``went_stale``), or None: open one yourself. Counts the arrival, which sizes the pool."""
        if self.size == 0:
            return None
        key = (upstream, family, address, mark)
        pool = self.pools.get(key)
        now = time.monotonic()
        if pool is None:
            pool = self.pools[key] = Pool(key)
        second = int(now)
        if pool.arrivals and pool.arrivals[-1][0] == second:
            pool.arrivals[-1][1] += 1
        else:
            pool.arrivals.append([second, 1])
        pool.last_arrival = now
        while pool.ready:
            opened, sock = pool.ready.popleft()
            if now - opened < pool.max_age and not closed_by_proxy(sock):
                self._count("taken")
                self._refill(pool, now)  # its replacement, at once: over loopback the connect is done inside
                return sock, pool, opened
            self._drop(pool, opened, sock, now)
        self._count("missed")
        self._wake.set()  # a pool new or run dry: the sweep sizes and fills it
        return None

    def keep(self, upstream, family: int, address, mark: int | None, sock: socket.socket) -> bool:
        """Take a proxy connection a plain-HTTP client left, idle between two exchanges, for the next
        client's requests; False (the caller closes it) when that proxy's are at KEPT_MAX already."""
        key = (upstream, family, address, mark)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(key)
        if len(pool.kept) >= KEPT_MAX:
            return False
        pool.kept.append((time.monotonic(), sock))
        self._count("kept")
        return True

    def take_kept(self, upstream, family: int, address, mark: int | None) -> socket.socket | None:
        """A keep-alive connection another client left (the newest: the oldest may have timed out at the
        proxy), or None. The proxy may still close it as the request crosses: replay what is safe to."""
        pool = self.pools.get((upstream, family, address, mark))
        now = time.monotonic()
        while pool is not None and pool.kept:
            since, sock = pool.kept.pop()
            if now - since < KEPT_MAX_AGE and not readable_now(sock):
                self._count("reused")
                return sock
            sock.close()
        return None

    def target(self, pool: Pool, now: float) -> int:
        """How many to keep: the fixed size, or the most clients that came within one second lately
        (a docker pull opens three layers at once); none once clients stopped coming."""
        if self.size == 0 or now - pool.last_arrival > KEEP_WARM:
            return 0
        if self.size is not None:
            return self.size
        recent = [count for second, count in pool.arrivals if now - second <= RATE_WINDOW]
        return min(AUTO_MAX, max(recent, default=1))

    async def run(self) -> None:
        """Sweep and refill every pool, every SWEEP_INTERVAL or when a client took from one."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    self._sweep()
                    with trio.move_on_after(SWEEP_INTERVAL):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._nursery = None
            self.close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def _sweep(self) -> None:
        now = time.monotonic()
        for key, pool in list(self.pools.items()):
            for opened, sock in list(pool.ready):
                if now - opened >= pool.max_age or closed_by_proxy(sock):
                    pool.ready.remove((opened, sock))
                    self._drop(pool, opened, sock, now)
            for since, sock in list(pool.kept):
                if now - since >= KEPT_MAX_AGE or readable_now(sock):
                    pool.kept.remove((since, sock))
                    sock.close()
            target = self.target(pool, now)
            if target == 0 and not pool.ready and not pool.kept and not pool.filling:
                del self.pools[key]
                continue
            while len(pool.ready) + pool.filling > target and pool.ready:
                pool.ready.pop()[1].close()  # the newest: the oldest go first anyway
            while self._refill(pool, now):
                pass

    def _refill(self, pool: Pool, now: float) -> bool:
        """Open one more connection for ``pool`` if it is short of its size and not backing off: made at
        once when the kernel can (a proxy on this machine), else finished by a task. Whether one began."""
        if now < pool.retry_at or len(pool.ready) + pool.filling >= self.target(pool, now):
            return False
        family, address, mark = pool.key[1:]
        try:
            sock = new_socket(family, mark)
        except OSError as exc:  # out of fds: the clients' own dials will say so
            self._failed(pool, exc)
            return False
        tls = pool.key[0].scheme == "https"  # then the TLS handshake too, in a task: it saves a round trip
        try:
            connected = connected_at_once(sock, address)
            if connected and not tls:
                pool.ready.append((now, sock))
                pool.backoff = 0.0
                return True
        except OSError as exc:
            sock.close()
            self._failed(pool, exc)
            return False
        if self._nursery is None:  # not running (stopping): nothing would finish it
            sock.close()
            return False
        pool.filling += 1
        self._nursery.start_soon(self._finish_connect, pool, sock, address, connected)
        return True

    async def _finish_connect(self, pool: Pool, sock: socket.socket, address, connected: bool = False) -> None:
        try:
            deadline = trio.current_time() + self.connect_timeout
            if not connected:
                await connect_now(sock, address, deadline)
            if pool.key[0].scheme == "https":
                sock = await secured(sock, pool.key[0], deadline)
        except (OSError, trio.TooSlowError, UpstreamError) as exc:
            sock.close()
            self._failed(pool, exc)
            return
        except BaseException:
            sock.close()
            raise
        finally:
            pool.filling -= 1
        pool.backoff = 0.0
        if self.pools.get(pool.key) is not pool:  # dropped meanwhile (went cold)
            sock.close()
            return
        pool.ready.append((time.monotonic(), sock))

    @staticmethod
    def _failed(pool: Pool, exc: BaseException) -> None:
        """The health checks and the clients' own dials tell of a proxy that cannot be reached; this only
        waits before trying again: 1 s, doubling to 30 s."""
        pool.backoff = min(RETRY_AFTER[1], max(RETRY_AFTER[0], pool.backoff * 2))
        pool.retry_at = time.monotonic() + pool.backoff
        log.debug("preconnect to %s failed: %r; next try in %g s", pool.key[0], exc, pool.backoff)

    def went_stale(self, pool: Pool, opened: float) -> None:
        """A connection taken from ``pool`` turned out closed when its handshake began: some proxies
        (dante) notice their negotiation timeout only when the client speaks."""
        self._closed_early(pool, time.monotonic() - opened)

    def _drop(self, pool: Pool, opened: float, sock: socket.socket, now: float) -> None:
        age = now - opened
        if age < pool.max_age:
            self._closed_early(pool, age)
        else:
            self._count("aged")
        sock.close()

    def _closed_early(self, pool: Pool, age: float) -> None:
        """The proxy closed one before our own limit: keep them younger from now on."""
        pool.max_age = max(MIN_AGE, min(pool.max_age, age * 0.75))
        log.debug("upstream %s closed a pre-opened connection after %.1f s", pool.key[0], age)
        self._count("closed")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.preconnect(outcome)
