"""Pure-Python twin of ``relay/_fastpath.pyx``: same functions, same Engine API (``_fastpath.pyi``).

Used when the extension is not built or RELAY_NO_EXTENSIONS=1. Instead of a
pipe, each direction copies through one bounded buffer, drained before the
next read, so it behaves exactly like the splice version, one copy slower.
"""

import contextlib
import errno
import math
import mmap
import operator
import os
import select
import socket
import struct
import threading

from relay import ends
from relay.dns.wire import peek_query as _peek_query
from relay.udp import datagram

NAME = "python"

_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
_IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>
_IP_TRANSPARENT = 19  # <linux/in.h>
_IPV6_TRANSPARENT = 75  # <linux/in6.h>
_PIPE_BUFFER = 65536  # the kernel's default pipe size, so both twins buffer alike


def original_dst(sock):
    """The address a REDIRECTed connection was sent to, as (host, port)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.IPPROTO_IP, _SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntop(socket.AF_INET, packed), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, _IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return socket.inet_ntop(socket.AF_INET6, packed), port


def set_transparent(sock):
    """Let a TPROXY listener accept connections addressed to any IP (needs CAP_NET_ADMIN)."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, _IP_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)


POOL_MAX = 64
# Empty buffers kept for the next connection, as the extension keeps empty pipes.
_pool: list[memoryview] = []


def pooled_pipes():
    """How many empty buffers wait for reuse (for tests)."""
    return len(_pool)


def _take_buffer(wanted: int) -> memoryview:
    """An empty buffer (pooled if any), of ``wanted`` bytes if that is > 0, as the extension takes a pipe."""
    buffer = _pool.pop() if _pool else memoryview(bytearray(_PIPE_BUFFER))
    if wanted > 0 and len(buffer) != _pipe_size(wanted):
        buffer = memoryview(bytearray(_pipe_size(wanted)))
    return buffer


def _pipe_size(wanted: int) -> int:
    """The size F_SETPIPE_SZ gives a pipe asked for ``wanted`` bytes: a power of two pages."""
    pages = -(-wanted // mmap.PAGESIZE)
    return mmap.PAGESIZE << (pages - 1).bit_length()


# Arguments are converted as Cython converts the extension's typed ones, so that
# both twins accept, truncate and refuse the same values.
def _c_int(value, bits: int = 32) -> int:
    """As a C ``int`` (or ``long long``) argument: through __int__, so a float is truncated."""
    if not hasattr(type(value), "__int__"):
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    number = int(value)
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise OverflowError(f"value too large to convert to a {bits}-bit integer")
    return number


def _c_size(value) -> int:
    """As a ``Py_ssize_t`` argument: integers only (through __index__)."""
    return _c_int(operator.index(value), 64)


def _c_double(value) -> float:
    """As a C ``double`` argument: a number, never a string."""
    if not (hasattr(type(value), "__float__") or hasattr(type(value), "__index__")):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(value)


def _exactly(kind: type, value, name: str, none_allowed: bool):
    """As an argument typed ``bytes`` or ``str``: that very type (or None where Cython lets it through)."""
    if type(value) is not kind and not (none_allowed and value is None):
        raise TypeError(f"Argument '{name}' has incorrect type (expected {kind.__name__}, got {type(value).__name__})")
    return value


# What advancing one way came to (see the extension's Engine).
_WAITING, _FINISHED, _OUT_OF_BUDGET, _FAILED, _HELD = range(5)
_LOCAL = 2  # who failed, besides the sides 0 (client) and 1 (upstream)
_MAX_EVENTS = 256
_SOCKET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_PAUSED_EVENTS = select.EPOLLOUT | select.EPOLLET  # errors and hangups are reported anyway
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_LINGER_RESET = struct.pack("ii", 1, 0)


def _handle_of(conn, slot):
    """What names a connection to Python: its slot, and the slot's generation (31 bits, as the extension's)."""
    return (conn.generation & 0x7FFFFFFF) << 32 | slot


class _Way:
    """One direction, fd[side] -> buffer -> fd[1 - side]; the buffer is held only while bytes are in it."""

    __slots__ = (
        "view",
        "start",
        "pending",
        "eof",
        "shut",
        "write_blocked",
        "queued",
        "paused",
        "held",
        "first",
        "moved",
    )

    def __init__(self, first: bytes):
        self.view = None
        self.start = self.pending = self.moved = 0
        self.eof = self.shut = self.write_blocked = self.queued = self.paused = self.held = False
        self.first = memoryview(first) if first else None

    def give_back(self):
        if self.view is not None and self.pending == 0 and len(_pool) < POOL_MAX:
            _pool.append(self.view)
        self.view = None
        self.pending = 0


class _Conn:
    __slots__ = (
        "fds",
        "ways",
        "last_active",
        "idle_timeout",
        "half_closed_timeout",
        "pipe_size",
        "half_closed",
        "hold_upstream_eof",
        "generation",
        "token",
        "in_use",
    )


def _with_socket(fd: int, action) -> None:
    """Run ``action(sock)`` on a socket object borrowed for ``fd`` (the fd stays open)."""
    sock = socket.socket(fileno=fd)
    try:
        action(sock)
    finally:
        sock.detach()


def _so_error(sock) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


class Engine:
    """Established connections, copied through bounded buffers and woken through one epoll fd.

    Same design and API as the extension's Engine: each socket registered once,
    edge-triggered; a way reads until the source is empty or the destination full.
    """

    # No other attributes, as on the extension's type.
    __slots__ = ("_conns", "_free", "_backlog", "_failure", "_held", "_next_deadline", "_moved", "_slots", "_epoll")

    def __init__(self):
        self._conns: list[_Conn] = []
        self._free: list[int] = []
        self._backlog: list[int] = []
        self._failure = (0, 0)
        self._held = []  # (handle, token) of upstream FINs not yet reported by take_held()
        self._next_deadline = math.inf
        self._moved = 0
        # fd -> slot * 2 + side: epoll here reports fds, not the extension's 64-bit cookies.
        self._slots: dict[int, int] = {}
        self._epoll = select.epoll()

    def __del__(self):
        # As the extension's __dealloc__: close() was not called, so no one is told, but nothing leaks.
        for conn in getattr(self, "_conns", ()):  # none if __init__ failed early
            if conn.in_use:
                for fd, way in zip(conn.fds, conn.ways):
                    os.close(fd)
                    way.give_back()

    @property
    def next_deadline(self):
        """No connection times out before this (inf: none can)."""
        return self._next_deadline

    @property
    def moved(self):
        """Bytes moved by the last run()."""
        return self._moved

    def fileno(self):
        return -1 if self._epoll.closed else self._epoll.fileno()

    def __len__(self):
        return len(self._conns) - len(self._free)

    @property
    def backlogged(self):
        """True if some way has work left that no epoll event will announce: run() again soon."""
        return bool(self._backlog)

    def add(
        self,
        client_fd,
        upstream_fd,
        token,
        now,
        idle_timeout,
        half_closed_timeout,
        pipe_size=0,
        to_upstream_first=b"",
        to_client_first=b"",
        hold_upstream_eof=False,
    ):
        """Take over a connection: on success the engine owns (and will close) both fds (non-blocking).

        With ``hold_upstream_eof``, the upstream's FIN is held: see take_held().
        Returns the connection's handle.
        """
        client_fd, upstream_fd, pipe_size = _c_int(client_fd), _c_int(upstream_fd), _c_int(pipe_size)
        now, idle_timeout, half_closed_timeout = _c_double(now), _c_double(idle_timeout), _c_double(half_closed_timeout)
        to_upstream_first = _exactly(bytes, to_upstream_first, "to_upstream_first", none_allowed=True)
        to_client_first = _exactly(bytes, to_client_first, "to_client_first", none_allowed=True)
        hold_upstream_eof = bool(hold_upstream_eof)
        if not self._free:
            self._conns.append(_Conn())
            self._conns[-1].generation, self._conns[-1].in_use = 0, False
            self._free.append(len(self._conns) - 1)
        slot = self._free[-1]
        self._epoll.register(client_fd, _SOCKET_EVENTS)
        try:
            self._epoll.register(upstream_fd, _SOCKET_EVENTS)
        except OSError:
            self._epoll.unregister(client_fd)
            raise
        self._free.pop()
        conn = self._conns[slot]
        conn.fds = (client_fd, upstream_fd)
        conn.ways = (_Way(to_upstream_first), _Way(to_client_first))
        conn.last_active = now
        self._next_deadline = min(self._next_deadline, now + idle_timeout)
        conn.idle_timeout, conn.half_closed_timeout = idle_timeout, half_closed_timeout
        conn.pipe_size = pipe_size
        conn.half_closed = False
        conn.hold_upstream_eof = hold_upstream_eof
        conn.token = token
        conn.in_use = True
        self._slots[client_fd] = slot * 2
        self._slots[upstream_fd] = slot * 2 + 1
        return _handle_of(conn, slot)

    def _fail(self, who, error):
        self._failure = (who, error)
        return _FAILED

    def _advance(self, conn, side, budget, now):
        """Move one way's bytes until it blocks, finishes, fails or the budget is spent.

        Returns (outcome, budget left). The buffer is drained before more is read.
        """
        way = conn.ways[side]
        src, dst = conn.fds[side], conn.fds[1 - side]
        if way.shut:
            return _FINISHED, budget
        if way.held:
            return _WAITING, budget  # nothing moves this way until release()
        while True:
            while way.first is not None:
                try:
                    n = os.write(dst, way.first)
                except BlockingIOError:
                    way.write_blocked = True
                    return _WAITING, budget
                except OSError as exc:
                    return self._fail(1 - side, exc.errno), budget
                way.moved += n
                budget -= n
                conn.last_active = now
                way.first = way.first[n:] or None
            while way.pending > 0:
                try:
                    n = os.write(dst, way.view[way.start : way.start + way.pending])
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    return self._fail(1 - side, exc.errno), budget
                if n == 0:
                    way.write_blocked = True
                    return _WAITING, budget
                way.start += n
                way.pending -= n
                way.moved += n
                budget -= n
                conn.last_active = now
            way.write_blocked = False
            if way.eof:
                way.give_back()
                if side == 1 and conn.hold_upstream_eof:
                    way.held = True
                    return _HELD, budget
                try:
                    _with_socket(dst, lambda sock: sock.shutdown(socket.SHUT_WR))
                except OSError as exc:
                    return self._fail(1 - side, exc.errno), budget
                way.shut = True
                if not conn.half_closed:
                    # From now on the silence allowed is the (shorter) half-closed timeout.
                    conn.half_closed = True
                    conn.last_active = now
                    self._next_deadline = min(
                        self._next_deadline, now + min(conn.idle_timeout, conn.half_closed_timeout)
                    )
                return _FINISHED, budget
            if budget <= 0:
                return _OUT_OF_BUDGET, budget
            if way.view is None:
                try:
                    way.view = _take_buffer(conn.pipe_size)
                except MemoryError:
                    return self._fail(_LOCAL, errno.ENOMEM), budget
            try:
                n = os.readv(src, [way.view])
            except BlockingIOError:
                way.give_back()  # empty: an idle connection holds no buffer
                return _WAITING, budget
            except OSError as exc:
                return self._fail(side, exc.errno), budget
            if n == 0:
                way.eof = True
            else:
                way.start, way.pending = 0, n

    def _step(self, slot, side, budget, now, finished):
        """Advance one way; end the connection if that finished or failed it. Returns the budget left."""
        conn = self._conns[slot]
        if budget <= 0:
            outcome = _OUT_OF_BUDGET  # no I/O at all: the way just waits for the next run
        else:
            outcome, budget = self._advance(conn, side, budget, now)
        if outcome == _OUT_OF_BUDGET:
            if not conn.ways[side].queued:
                conn.ways[side].queued = True
                self._backlog.append(slot * 2 + side)
        elif outcome == _FAILED:
            who, error = self._failure
            self._finish(slot, ends.local_failure(error) if who == _LOCAL else ends.RESET_BY[who], False, finished)
        elif outcome == _FINISHED and conn.ways[1 - side].shut:
            self._finish(slot, ends.CLOSED, True, finished)
        elif outcome == _HELD:
            self._held.append((_handle_of(conn, slot), conn.token))
        elif conn.ways[side].paused != conn.ways[side].write_blocked:
            self._pause_reading(conn, side, conn.ways[side].write_blocked)
        return budget

    def _pause_reading(self, conn, side, paused):
        """While a way waits for room in its destination, its source's data must not wake the engine.

        Turning EPOLLIN back on reports the source at once if it has data, so no edge is lost.
        """
        try:
            self._epoll.modify(conn.fds[side], _PAUSED_EVENTS if paused else _SOCKET_EVENTS)
        except OSError:
            return  # still armed for everything: only more wakeups
        conn.ways[side].paused = paused

    def _finish(self, slot, ended, clean, finished):
        """Close both sockets (with a reset unless ``clean``) and report the connection ended ``ended``."""
        conn = self._conns[slot]
        for side, fd in enumerate(conn.fds):
            self._epoll.unregister(fd)
            del self._slots[fd]
            if not clean:
                try:
                    _with_socket(fd, lambda sock: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET))
                except OSError:
                    pass  # already dead: closing is all that is left to do
            os.close(fd)
            conn.ways[side].give_back()
        finished.append((conn.token, ended, conn.ways[0].moved, conn.ways[1].moved))
        conn.token = conn.ways = conn.fds = None
        conn.in_use = False
        conn.generation += 1
        self._free.append(slot)

    def run(self, now, budget):
        """Handle what is ready (never blocks); returns the connections that ended, as
        (token, ended, sent_up, sent_down). Stops after about ``budget`` bytes: see ``backlogged``;
        ``moved`` then says how many bytes it moved."""
        now, budget = _c_double(now), _c_size(budget)
        finished = []
        self._moved = 0  # and stays 0 if the run fails
        self._moved = budget - self._run(now, budget, finished)
        return finished

    def _run(self, now, budget, finished):
        """run()'s work; returns the budget left."""
        backlog, self._backlog = self._backlog, []
        for entry in backlog:
            slot, side = entry >> 1, entry & 1
            conn = self._conns[slot]
            if conn.in_use and conn.ways[side].queued:
                conn.ways[side].queued = False
                budget = self._step(slot, side, budget, now, finished)
        if budget <= 0:
            return budget  # edge-triggered events wait in the kernel's ready list, not lost
        try:
            events = self._epoll.poll(0, _MAX_EVENTS)
        except InterruptedError:
            return budget
        for fd, ready in events:
            entry = self._slots.get(fd)
            if entry is None:
                continue  # it ended earlier in this batch
            slot, side = entry >> 1, entry & 1
            conn = self._conns[slot]
            if ready & select.EPOLLERR:
                errors = []
                _with_socket(conn.fds[side], lambda sock, out=errors: out.append(_so_error(sock)))
                if errors[0]:
                    self._finish(slot, ends.RESET_BY[side], False, finished)
                    continue
            if ready & _READABLE and not conn.ways[side].write_blocked:
                budget = self._step(slot, side, budget, now, finished)
            other = conn.ways[1 - side] if conn.in_use else None
            if (
                ready & (select.EPOLLOUT | select.EPOLLERR)
                and other
                and (other.write_blocked or other.first is not None)
            ):
                budget = self._step(slot, 1 - side, budget, now, finished)
        return budget

    def _live_slot(self, handle):
        """The slot of the connection ``handle`` names, or -1 if that connection has ended."""
        slot = handle & 0xFFFFFFFF
        if slot >= len(self._conns) or not self._conns[slot].in_use or _handle_of(self._conns[slot], slot) != handle:
            return -1
        return slot

    def counts(self):
        """(token, sent_up, sent_down) of every connection relaying now, so far: read on demand (the status page),
        at no cost to the relaying itself."""
        return [(conn.token, conn.ways[0].moved, conn.ways[1].moved) for conn in self._conns if conn.in_use]

    def take_held(self):
        """The upstream FINs held since the last call, as (handle, token): each waits for release()
        or abort(). A connection that ended meanwhile (in the same run, or by expire()) is left out."""
        held = [(handle, token) for handle, token in self._held if self._live_slot(handle) >= 0]
        self._held = []
        return held

    def release(self, handle, now):
        """Forward a held upstream FIN. Returns the connections that ended, as run() does; a handle
        whose FIN is not held, or whose connection already ended (a reset, a timeout), is ignored."""
        handle, now = _c_int(handle, 64), _c_double(now)
        finished = []
        slot = self._live_slot(handle)
        if slot < 0 or not self._conns[slot].ways[1].held:
            return finished
        self._conns[slot].ways[1].held = False
        self._conns[slot].hold_upstream_eof = False  # the upstream has no other FIN to hold
        self._step(slot, 1, 1 << 30, now, finished)  # only the FIN is left to move
        return finished

    def abort(self, handle, ended):
        """Reset both sides of a connection (one whose FIN is held, say) and report it ended ``ended``,
        as run() does; a handle whose connection already ended is ignored."""
        handle, ended = _c_int(handle, 64), _exactly(str, ended, "ended", none_allowed=False)
        finished = []
        slot = self._live_slot(handle)
        if slot >= 0:
            self._finish(slot, ended, False, finished)
        return finished

    def reclaim(self, ended):
        """Reset the connection idle longest among those whose client has not sent a byte, and
        report it ended ``ended``, as run() does; nothing if every client has spoken."""
        ended = _exactly(str, ended, "ended", none_allowed=False)
        finished = []
        silent = [
            (conn.last_active, slot)
            for slot, conn in enumerate(self._conns)
            if conn.in_use and conn.ways[0].moved == 0 and conn.ways[0].pending == 0 and conn.ways[0].first is None
        ]
        if silent:
            self._finish(min(silent)[1], ended, False, finished)
        return finished

    def expire(self, now):
        """End the connections silent for longer than their timeout; returns them as run() does."""
        now = _c_double(now)
        finished = []
        next_deadline = math.inf
        for slot, conn in enumerate(self._conns):
            if not conn.in_use:
                continue
            limit = min(conn.idle_timeout, conn.half_closed_timeout) if conn.half_closed else conn.idle_timeout
            deadline = conn.last_active + limit
            if deadline <= now:
                self._finish(slot, ends.HALF_CLOSED_TIMEOUT if conn.half_closed else ends.IDLE_TIMEOUT, False, finished)
            else:
                next_deadline = min(next_deadline, deadline)
        self._next_deadline = next_deadline
        return finished

    def close(self):
        """Reset every connection left (shutdown); returns them as run() does, ended ends.CANCELLED."""
        finished = []
        for slot, conn in enumerate(self._conns):
            if conn.in_use:
                self._finish(slot, ends.CANCELLED, False, finished)
        self._epoll.close()
        self._next_deadline = math.inf
        self._backlog = []
        self._held = []
        return finished


class Conduit:
    """One direction, src -> buffer -> dst, for a counted run of bytes (see the extension's Conduit)."""

    __slots__ = ("_way", "_src", "_dst", "_pipe_size", "eof", "failed_side")

    def __init__(self, src_fd, dst_fd, pipe_size=0):
        self._src, self._dst, self._pipe_size = _c_int(src_fd), _c_int(dst_fd), _c_int(pipe_size)
        self._way = _Way(b"")
        self.eof = False
        self.failed_side = -1  # after an OSError from move(): 0 the source's, 1 the destination's

    def __del__(self):
        way = getattr(self, "_way", None)
        if way is not None:
            way.give_back()

    @property
    def pending(self):
        """Bytes read from the source and not yet written: while there are, move() waits to write."""
        return self._way.pending

    def move(self, limit):
        """Write what is pending, then read at most ``limit`` bytes and write them, until the source
        is empty, the destination full, or the count read; returns the bytes read from the source."""
        limit = _c_size(limit)
        way = self._way
        taken = 0
        while True:
            while way.pending > 0:
                try:
                    n = os.write(self._dst, way.view[way.start : way.start + way.pending])
                except BlockingIOError:
                    return taken
                except OSError:
                    self.failed_side = 1
                    raise
                way.start += n
                way.pending -= n
            if limit - taken <= 0 or self.eof:
                way.give_back()
                return taken
            if way.view is None:
                way.view = _take_buffer(self._pipe_size)
            try:
                n = os.readv(self._src, [way.view[: min(limit - taken, len(way.view))]])
            except BlockingIOError:
                way.give_back()  # empty: a waiting body holds no buffer
                return taken
            except OSError:
                self.failed_side = 0
                raise
            if n == 0:
                self.eof = True
            else:
                way.start, way.pending = 0, n
                taken += n

    def close(self):
        """Give the buffer back (to the pool if empty; bytes left in it are dropped)."""
        self._way.give_back()


# -- UDP: the datagrams of associated sessions, relayed by a thread ---------------------------------

_UDP_BATCH = 32  # datagrams read from one socket before the others get a turn
_MAX_DATAGRAM = 65535
_MAX_REMOTES_PER_SESSION = 256
_UDP_MAX_ENTRIES = 1 << 22
_IP_ORIGDSTADDR = 20
_IPV6_ORIGDSTADDR = 74
_CONTROL_SPACE = 128
# The largest UDP payload: 65535 less the IP and UDP headers (IPv6 has no header in its limit).
_MAX_UDP_PAYLOAD = {socket.AF_INET: 65535 - 28, socket.AF_INET6: 65535 - 8}

UDP_DROPS = (
    "no-destination",
    "oversize",
    "send-blocked",
    "send-failed",
    "malformed",
    "fragment",
    "wrong-family",
    "remotes-full",
    "reply-socket",
    "queue-full",
    "unasked",
)


def _addr(address) -> tuple[int, bytes, int]:
    """(family, packed address, port) of a (host, port): what the engine compares."""
    host, port = address[0].split("%")[0], address[1]
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} is not in 0-65535")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, host), port
        except OSError:
            pass
    raise ValueError(f"{address[0]!r} is not an IP address")


def _python(addr) -> tuple[str, int]:
    return socket.inet_ntop(addr[0], addr[1]), addr[2]


def _destination(ancillary):
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_ORIGDSTADDR and len(data) >= 8:
            port, packed = struct.unpack_from("!2xH4s", data)
            return (socket.AF_INET, packed, port) if port else None
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_ORIGDSTADDR and len(data) >= 24:
            port, packed = struct.unpack_from("!2xH4x16s", data)
            return (socket.AF_INET6, packed, port) if port else None
    return None


class _UdpSession:
    __slots__ = (
        "client",
        "client_python",
        "sock",
        "remotes",
        "asked",
        "asked_next",
        "counts",
        "active",
        "generation",
        "in_use",
    )

    def __init__(self):
        self.generation = 0
        self.in_use = False


class UdpEngine:
    """The datagrams of associated UDP sessions, relayed by a thread of its own (see the extension's)."""

    def __init__(self, max_sessions, max_reply_sockets, mark=-1, queue_limit=256):
        bounded = 1 <= max_sessions <= _UDP_MAX_ENTRIES and 0 <= max_reply_sockets <= _UDP_MAX_ENTRIES
        if not bounded or queue_limit < 1:
            raise ValueError(
                f"a UdpEngine needs 1 to {_UDP_MAX_ENTRIES} sessions, 0 to {_UDP_MAX_ENTRIES} reply sockets and a queue"
            )
        if not -1 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"{mark} is not a 32-bit mark (or -1: none)")
        self._max_reply_sockets = max_reply_sockets
        self._mark = mark
        self._queue_limit = queue_limit
        self._lock = threading.Lock()
        self._sessions = [_UdpSession() for _ in range(max_sessions)]
        self._free = list(range(max_sessions - 1, -1, -1))
        self._by_client: dict = {}
        self._by_fd: dict[int, int] = {}  # a session's socket -> its slot
        self._replies: dict = {}  # remote -> [socket, users]
        self._listeners: dict[int, socket.socket] = {}
        self._handoffs: list = []
        self._drops = dict.fromkeys(UDP_DROPS, 0)
        self._reply_errno = 0
        self._thread = None
        self._epoll = select.epoll()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handoff_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._stop_fd, select.EPOLLIN)

    def _check_open(self):
        if self._epoll.closed:
            raise ValueError("the UDP engine is closed")

    def fileno(self):
        """Readable while take() has datagrams to give."""
        self._check_open()
        return self._handoff_fd

    def start(self):
        """Start the thread that relays."""
        self._check_open()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="udp-engine", daemon=True)
            self._thread.start()

    def add_listener(self, fd):
        self._check_open()
        with self._lock:
            self._epoll.register(fd, select.EPOLLIN)
            self._listeners[fd] = socket.socket(fileno=fd)

    def add_session(self, client, udp_fd, first=()):
        self._check_open()
        client_addr = _addr(client)
        pending = [(_addr(destination), bytes(payload)) for destination, payload in first]
        for (_, _, port), _ in pending:
            if port == 0:
                raise ValueError("a datagram cannot go to port 0")
        with self._lock:
            if client_addr in self._by_client:
                raise ValueError(f"{client} has a session already")
            if not self._free:
                raise OverflowError("the UDP engine's sessions are all in use")
            slot = self._free[-1]
            s = self._sessions[slot]
            self._epoll.register(udp_fd, select.EPOLLIN)
            self._free.pop()
            s.client, s.client_python = client_addr, _python(client_addr)
            s.sock = socket.socket(fileno=udp_fd)
            s.remotes = []
            s.asked, s.asked_next = [], 0
            s.counts = [0, 0, 0, 0]
            s.active = False
            s.in_use = True
            self._by_client[client_addr] = slot
            self._by_fd[udp_fd] = slot
            for dest, payload in pending:
                self._send_up(s, dest, payload)
            kept = []
            for handoff in self._handoffs:
                if handoff[0] == client_addr:
                    self._send_up(s, handoff[1], handoff[2])
                else:
                    kept.append(handoff)
            self._handoffs = kept
            return (s.generation << 32) | slot

    def remove_session(self, handle):
        self._check_open()
        slot = handle & 0xFFFFFFFF
        if not 0 <= slot < len(self._sessions):
            raise KeyError(handle)
        with self._lock:
            s = self._sessions[slot]
            if not s.in_use or s.generation != handle >> 32:
                raise KeyError(handle)
            with contextlib.suppress(OSError):  # closed already: as epoll_ctl's error in the extension
                self._epoll.unregister(s.sock.fileno())
            del self._by_fd[s.sock.detach()]
            del self._by_client[s.client]
            for remote in s.remotes:
                self._release_reply(remote)
            result = (*s.counts, len(s.remotes))
            s.in_use = False
            s.sock = s.remotes = s.asked = None
            s.generation = (s.generation + 1) & 0x7FFFFFFF
            self._free.append(slot)
            return result

    def take(self):
        self._check_open()
        with self._lock:
            taken = [(_python(client), _python(dest), payload) for client, dest, payload in self._handoffs]
            self._handoffs = []
            try:
                os.eventfd_read(self._handoff_fd)
            except BlockingIOError:
                pass
        return taken

    def collect(self):
        self._check_open()
        with self._lock:
            drops = {reason: count for reason, count in self._drops.items() if count}
            self._drops = dict.fromkeys(UDP_DROPS, 0)
            active = []
            for slot, s in enumerate(self._sessions):
                if s.in_use and s.active:
                    active.append(((s.generation << 32) | slot, *s.counts))
                    s.counts = [0, 0, 0, 0]
                    s.active = False
            reply_errno, self._reply_errno = self._reply_errno, 0
        return drops, active, reply_errno

    def __del__(self):
        if hasattr(self, "_epoll"):  # __init__ got that far
            self.close()  # never the caller's sockets: they are detached

    def close(self):
        if self._epoll.closed:
            return
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            self._thread = None
        for sock, _ in self._replies.values():
            sock.close()
        self._replies.clear()
        for s in self._sessions:
            if s.in_use:
                s.sock.detach()
                s.in_use = False
        for sock in self._listeners.values():
            sock.detach()
        self._listeners.clear()
        self._handoffs = []
        self._epoll.close()
        os.close(self._stop_fd)
        os.close(self._handoff_fd)

    # -- the thread ----------------------------------------------------------------

    def _run(self):
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            with self._lock:
                for fd, _ in events:
                    if fd == self._stop_fd:
                        return
                    listener = self._listeners.get(fd)
                    if listener is not None:
                        self._from_clients(listener)
                    else:
                        self._from_proxy(fd)

    def _from_clients(self, listener):
        for _ in range(_UDP_BATCH):
            try:
                data, ancillary, flags, source = listener.recvmsg(_MAX_DATAGRAM, _CONTROL_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error for an earlier datagram, reported here
            dest = _destination(ancillary)
            if dest is None:
                self._drops["no-destination"] += 1
                continue
            if flags & socket.MSG_TRUNC:
                self._drops["oversize"] += 1
                continue
            client = _addr(source)
            slot = self._by_client.get(client)
            if slot is not None:
                self._send_up(self._sessions[slot], dest, data)
            elif len(self._handoffs) >= self._queue_limit:
                self._drops["queue-full"] += 1
            else:
                self._handoffs.append((client, dest, data))
                if len(self._handoffs) == 1:
                    os.eventfd_write(self._handoff_fd, 1)

    def _send_up(self, s, dest, payload):
        message = datagram.header(*_python(dest)) + payload
        if len(message) > _MAX_UDP_PAYLOAD[s.sock.family]:
            self._drops["oversize"] += 1
            return
        try:
            s.sock.send(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self._drops["send-blocked"] += 1
            return
        except OSError as exc:
            self._drops["oversize" if exc.errno == errno.EMSGSIZE else "send-failed"] += 1
            return
        self._remember_asked(s, dest)
        s.counts[0] += 1
        s.counts[1] += len(payload)
        s.active = True

    @staticmethod
    def _remember_asked(s, dest):
        host = dest[:2]
        if host in s.asked:
            return
        if len(s.asked) < _MAX_REMOTES_PER_SESSION:
            s.asked.append(host)
        else:
            s.asked[s.asked_next] = host
            s.asked_next = (s.asked_next + 1) % len(s.asked)

    def _from_proxy(self, fd):
        slot = self._by_fd.get(fd)
        if slot is None:
            return  # ended while this event waited
        s = self._sessions[slot]
        for _ in range(_UDP_BATCH):
            try:
                data = s.sock.recv(_MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                host, port, payload = datagram.decode(data)
            except datagram.BadDatagram as exc:
                self._drops[exc.reason] += 1
                continue
            reply = self._reply_socket(s, _addr((host, port)))
            if reply is None:
                continue
            try:
                reply.sendto(payload, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, s.client_python)
            except OSError:
                self._drops["send-failed"] += 1
                continue
            s.counts[2] += 1
            s.counts[3] += len(payload)
            s.active = True

    def _reply_socket(self, s, remote):
        if remote in s.remotes:
            return self._replies[remote][0]
        if remote[0] != s.client[0]:
            self._drops["wrong-family"] += 1
            return None
        if remote[:2] not in s.asked:
            self._drops["unasked"] += 1
            return None
        if len(s.remotes) >= _MAX_REMOTES_PER_SESSION:
            self._drops["remotes-full"] += 1
            return None
        # Past a session's first remote, a socket (new or shared) only while more stay free than there are sessions.
        if s.remotes and self._max_reply_sockets - len(self._replies) <= len(self._sessions):
            self._reply_errno = errno.ENFILE
            self._drops["reply-socket"] += 1
            return None
        held = self._replies.get(remote)
        if held is None:
            try:
                held = self._replies[remote] = [self._open_reply(remote), 0]
            except OSError as exc:
                self._reply_errno = exc.errno or 0
                self._drops["reply-socket"] += 1
                return None
        held[1] += 1
        s.remotes.append(remote)
        return held[0]

    def _open_reply(self, remote):
        if len(self._replies) >= self._max_reply_sockets:
            raise OSError(errno.ENFILE, "the reply sockets are all in use")
        sock = socket.socket(remote[0], socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if remote[0] == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_transparent(sock)
            if self._mark >= 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", self._mark))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # it only sends
            sock.bind(_python(remote))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _release_reply(self, remote):
        held = self._replies[remote]
        held[1] -= 1
        if not held[1]:
            del self._replies[remote]
            held[0].close()


# -- DNS: cache hits answered without Python's service in between ------------------------------------

_HIT_BATCH = 64
_HIT_RECEIVE_SIZE = 4096
_HIT_MAX_REPLY = 4096
_HIT_MAX_ENTRIES = 1 << 22
_HIT_SCAN = 64
_TOLD_SET_BITS = 14
_TOLD_WAYS = 4
_COPIED_FLAGS = 0x0110  # RD and CD
_RETELL_AFTER = 10.0
_ID_FLAGS = struct.Struct("!HH")
_TTL = struct.Struct("!I")


class _HitEntry:
    __slots__ = ("key", "wire", "flags", "ttl_offsets", "ttls", "stored_at", "lifetime", "token", "generation")

    def __init__(self):
        self.key = self.wire = self.token = None
        self.stored_at = self.lifetime = 0.0
        self.generation = 0


class DnsHits:
    """See relay/_fastpath.pyx: the same table, slot for slot, and the same answers."""

    def __init__(self, capacity, networks=()):
        capacity = _c_int(capacity)
        if not 1 <= capacity <= _HIT_MAX_ENTRIES:
            raise ValueError(f"a DnsHits table holds 1 to {_HIT_MAX_ENTRIES} entries")
        self._entries = [_HitEntry() for _ in range(capacity)]
        self._free = list(range(capacity))[::-1]  # pop() takes the lowest first, as the extension's list does
        self._slots = {}  # (qname, qtype, qclass, edns) -> slot
        self._hand = 0
        self._told = {}  # index -> [client, slot, generation, at], made as first used (the extension's start zeroed)
        self._networks = []
        self.allow(networks)

    def __len__(self):
        return len(self._slots)

    def allow(self, networks):
        chosen = []
        for packed, prefix in list(networks):
            if not isinstance(packed, bytes) or len(packed) != 4 or not 0 <= prefix <= 32:
                raise ValueError(f"not an IPv4 network: {packed!r}/{prefix}")
            mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
            chosen.append((int.from_bytes(packed, "big") & mask, mask))
        self._networks = chosen

    def _unlink(self, slot):
        """Free an entry; what it held, for the caller to drop when done with the table (a finalizer run by
        the drop could take the free slot, or the entry, from under it)."""
        entry = self._entries[slot]
        held = entry.wire, entry.token
        del self._slots[entry.key]
        entry.key = entry.wire = entry.token = None
        entry.generation += 1
        self._free.append(slot)
        return held

    def put(self, qname, qtype, qclass, edns, wire, ttl_offsets, ttls, stored_at, lifetime, token, now):
        _exactly(bytes, qname, "qname", False)
        _exactly(bytes, wire, "wire", False)
        qtype, qclass = _c_int(qtype), _c_int(qclass)
        stored_at, lifetime, now = _c_double(stored_at), _c_double(lifetime), _c_double(now)
        if not 0 < len(qname) <= 255 or len(ttls) != len(ttl_offsets) or len(wire) < 12 + len(qname):
            raise ValueError("not a template for this question")
        offsets, values = [], []
        for offset, ttl in zip(ttl_offsets, ttls):
            offset, ttl = operator.index(offset), operator.index(ttl)
            if not 12 <= offset <= len(wire) - 4:
                raise ValueError("a TTL offset outside the template")
            if not 0 <= ttl <= 0xFFFFFFFF:
                raise ValueError("a TTL outside 32 bits")
            offsets.append(offset)
            values.append(ttl)
        key = (qname, qtype & 0xFFFF, qclass & 0xFFFF, bool(edns))
        slot, held = self._slots.get(key), None
        if slot is not None:
            held = self._unlink(slot)
        elif not self._free:
            for _ in range(min(_HIT_SCAN, len(self._entries))):
                self._hand = (self._hand + 1) % len(self._entries)
                entry = self._entries[self._hand]
                if not now - entry.stored_at < entry.lifetime:
                    held = self._unlink(self._hand)
                    break
            else:
                return False
        slot = self._free.pop()
        entry = self._entries[slot]
        entry.key, entry.wire, entry.token = key, wire, token
        entry.flags = _ID_FLAGS.unpack_from(wire)[1]
        entry.ttl_offsets, entry.ttls = offsets, values
        entry.stored_at, entry.lifetime = stored_at, lifetime
        entry.generation += 1
        self._slots[key] = slot
        del held  # dropped now that the table is whole
        return True

    def longest_chain(self):
        return 1 if self._slots else 0  # a dict: one key compared, but for hash collisions Python's seed spreads

    def forget(self, qname, qtype, qclass):
        _exactly(bytes, qname, "qname", False)
        held = []
        for edns in (False, True):
            slot = self._slots.get((qname, _c_int(qtype) & 0xFFFF, _c_int(qclass) & 0xFFFF, edns))
            if slot is not None:
                held.append(self._unlink(slot))
        del held  # dropped now that the table is whole

    def clear(self):
        held = [self._unlink(slot) for slot in sorted(self._slots.values())]
        del held  # dropped when all is gone: a finalizer it runs finds the table empty

    def untell(self, client, qname, qtype, qclass):
        _exactly(str, client, "client", False)
        _exactly(bytes, qname, "qname", False)
        try:
            address = int.from_bytes(socket.inet_pton(socket.AF_INET, client), "big")
        except (OSError, ValueError):  # not an IPv4 address (ValueError: a NUL in it)
            return
        for edns in (False, True):
            slot = self._slots.get((qname, _c_int(qtype) & 0xFFFF, _c_int(qclass) & 0xFFFF, edns))
            if slot is None:
                continue
            for told in self._told_set(address, slot):
                if told[1] == slot and told[0] == address:
                    told[1], told[3] = -1, 0.0

    def _told_set(self, client: int, slot: int) -> list:
        mixed = ((client ^ (slot * 0x9E3779B9 & 0xFFFFFFFF)) * 2654435761) & 0xFFFFFFFF
        first = (mixed >> (32 - _TOLD_SET_BITS)) * _TOLD_WAYS
        return [self._told.setdefault(first + way, [0, -1, 0, 0.0]) for way in range(_TOLD_WAYS)]

    def _allowed(self, packed: bytes) -> bool:
        client = int.from_bytes(packed, "big")
        return any(client & mask == network for network, mask in self._networks)

    def _tell(self, packed: bytes, slot: int, now: float) -> bool:
        client = int.from_bytes(packed, "big")
        ways = self._told_set(client, slot)
        generation = self._entries[slot].generation
        chosen = ways[0]
        for told in ways:
            if told[1] == slot and told[0] == client:
                chosen = told
                if told[2] == generation and now - told[3] < _RETELL_AFTER:
                    return False
                break
            if told[3] < chosen[3]:
                chosen = told
        chosen[:] = [client, slot, generation, now]
        return True

    def _render(self, peek, slot: int, now: float) -> bytes | None:
        entry = self._entries[slot]
        elapsed = now - entry.stored_at
        if not 0 <= elapsed < entry.lifetime or len(entry.wire) > min(peek.udp_limit, _HIT_MAX_REPLY):
            return None
        reply = bytearray(entry.wire)
        _ID_FLAGS.pack_into(reply, 0, peek.id, (entry.flags & ~_COPIED_FLAGS) | (peek.flags & _COPIED_FLAGS))
        reply[12 : 12 + len(peek.qname)] = peek.qname
        for offset, ttl in zip(entry.ttl_offsets, entry.ttls):
            left = (ttl if ttl < entry.lifetime else entry.lifetime) - elapsed
            _TTL.pack_into(reply, offset, int(left) if left > 0 else 0)
        return bytes(reply)

    def answer(self, fd, now, limit=_HIT_BATCH):
        now = _c_double(now)
        limit = min(max(_c_int(limit), 1), _HIT_BATCH)
        received, answers, left, unsent, told, counts = 0, [], [], [], [], {}
        sock = socket.socket(fileno=fd)
        try:
            for _ in range(limit):
                try:
                    query, source = sock.recvfrom(_HIT_RECEIVE_SIZE, socket.MSG_DONTWAIT)
                except OSError:
                    if received:
                        break  # recvmmsg keeps the error for the next call; recvfrom has taken it (a warning less)
                    raise
                received += 1
                peek = _peek_query(query)
                packed = socket.inet_aton(source[0])
                slot = None
                if peek is not None and self._allowed(packed):
                    slot = self._slots.get((peek.qname.lower(), peek.key[1], peek.key[2], peek.edns))
                reply = None if slot is None else self._render(peek, slot, now)
                if reply is None:
                    left.append((query, source))
                    continue
                answers.append((reply, source))
                counts[peek.key[1]] = counts.get(peek.key[1], 0) + 1
                if self._tell(packed, slot, now):
                    told.append((source[0], self._entries[slot].token))
            for number, (reply, source) in enumerate(answers):
                try:
                    sock.sendto(reply, socket.MSG_DONTWAIT, source)
                except OSError:
                    unsent.extend(answers[number:])
                    break
        finally:
            sock.detach()
        return received, left, unsent, told, counts
