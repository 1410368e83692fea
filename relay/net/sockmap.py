"""The kernel carries established connections: a BPF sockmap (``--engine sockmap``, experimental).

Both sockets of a connection go into one BPF sockhash, each stored under its
peer's socket cookie. A stream-verdict program of twelve instructions, built
here from its bytecode, runs for every segment a stored socket receives and
redirects it to the send side of the socket stored under the receiver's own
cookie: in softirq, without waking the relay. The relay watches only for FINs
and resets (EPOLLRDHUP, EPOLLERR) and reads the sockets' TCP_INFO counters.

What the kernel (6.18) does, found in the lab, and what it made this code do
(README's "sockmap" section has the measurements):
- No backpressure: a redirected segment leaves the receiver's queue at once
  and waits, unbounded, for room in the peer's send buffer, so a reader that
  stops lets a sender fill the router's memory (1.4 GB in 3 s over loopback).
  A sweep bounds each direction's backlog by resetting the connection.
- A FIN can arrive while bytes before it still wait to be sent on: it is
  forwarded only once the peer's written counter has caught up.
- A segment queued before a socket is stored waits for the next segment, and
  removing a socket drops what waits to be sent through it: sockets are stored
  with empty receive queues, and taken out again only while nothing can wait
  to be sent through them (see add()); otherwise they leave the map by closing.
- A pair cannot be stored at once: see add() for the order that keeps bytes in
  place, and the resets (relay.ends.STORE_RACE) where it cannot.
"""

import ctypes
import errno
import fcntl
import platform
import select
import socket
import struct
import time
from typing import NamedTuple

import trio

from relay import ends
from relay.logs import log
from relay.net import sockets

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD, _PROG_ATTACH = 0, 2, 3, 5, 8
_MAP_TYPE_SOCKHASH, _PROG_TYPE_SK_SKB, _ATTACH_SK_SKB_STREAM_VERDICT = 18, 14, 5
_HELPER_GET_SOCKET_COOKIE, _HELPER_SK_REDIRECT_HASH = 46, 72
_SK_PASS = 1
_SO_COOKIE = 57
_SIOCINQ, _SIOCOUTQ = 0x541B, 0x5411
_TCP_ESTABLISHED = 1
_TCP_INFO_SIZE = 136  # up to tcpi_bytes_received

SWEEP = 0.05  # how often backlogs, idle and half-closed connections are looked at
DRAIN_CHECK = 0.002  # how often a held FIN looks whether the bytes before it have gone on
MAX_BACKLOG = 32 << 20  # bytes one direction may hold in the kernel before the connection is reset (a flag)
CAPACITY = 1 << 16  # sockets the map holds
_DECLINED = "declined"  # not an end: the splice engine takes the connection
FORWARD_TRIES = 8  # reads of what an upstream says while its client is stored, and stores of it
BASELINE_TRIES = 8  # reads of a socket's counters until nothing moved between them
SETTLE_WAIT = 0.002  # how long bytes redirected during a store may take to reach the client's queue


def _instruction(code: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, offset, imm)


def verdict_program(map_fd: int) -> bytes:
    """key = own cookie; redirect to the socket stored under it; none stored: pass up to the relay."""
    return b"".join(
        (
            _instruction(0xBF, 6, 1),  # r6 = r1 (the skb)
            _instruction(0x85, imm=_HELPER_GET_SOCKET_COOKIE),  # r0 = the receiver's cookie
            _instruction(0x7B, 10, 0, -8),  # *(u64 *)(r10 - 8) = r0
            _instruction(0xBF, 1, 6),  # r1 = skb
            _instruction(0x18, 2, 1, imm=map_fd),  # r2 = the map (a 64-bit load, two slots)
            _instruction(0),
            _instruction(0xBF, 3, 10),  # r3 = r10 - 8: the key
            _instruction(0x07, 3, imm=-8),
            _instruction(0xB7, 4, imm=0),  # r4 = 0: to the peer's send side
            _instruction(0x85, imm=_HELPER_SK_REDIRECT_HASH),
            _instruction(0x55, 0, offset=1, imm=0),  # if r0 != SK_DROP: return it
            _instruction(0xB7, 0, imm=_SK_PASS),  # no peer stored: the relay reads it
            _instruction(0x95),
        )
    )


class Sockmap:
    """The kernel's objects: the sockhash and its verdict program. OSError if the kernel refuses
    (no CAP_BPF and CAP_NET_ADMIN, no sockmap in the kernel, an unknown architecture)."""

    def __init__(self, capacity: int = CAPACITY):
        number = _BPF_SYSCALL.get(platform.machine())
        if number is None:
            raise OSError(errno.ENOSYS, f"no bpf() syscall number known for {platform.machine()}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._number = number
        self.map_fd = self._bpf(_MAP_CREATE, struct.pack("<IIIII", _MAP_TYPE_SOCKHASH, 8, 4, capacity, 0))
        try:
            code = verdict_program(self.map_fd)
            instructions = ctypes.create_string_buffer(code, len(code))
            license_ = ctypes.create_string_buffer(b"GPL")
            self.prog_fd = self._bpf(
                _PROG_LOAD,
                struct.pack(
                    "<IIQQIIQ",
                    _PROG_TYPE_SK_SKB,
                    len(code) // 8,
                    ctypes.addressof(instructions),
                    ctypes.addressof(license_),
                    0,
                    0,
                    0,
                ),
            )
            self._bpf(_PROG_ATTACH, struct.pack("<IIII", self.map_fd, self.prog_fd, _ATTACH_SK_SKB_STREAM_VERDICT, 0))
        except OSError:
            _close(self.map_fd)
            raise

    def _bpf(self, command: int, attr: bytes) -> int:
        buffer = ctypes.create_string_buffer(attr, 128)
        result = self._libc.syscall(self._number, command, buffer, 128)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"bpf(): {errno.errorcode.get(code, code)}")
        return result

    def store(self, fd: int, key: int) -> None:
        key_buffer = ctypes.create_string_buffer(struct.pack("<Q", key), 8)
        value = ctypes.create_string_buffer(struct.pack("<I", fd), 4)
        attr = struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value), 0)
        self._bpf(_MAP_UPDATE_ELEM, attr)

    def remove(self, key: int) -> None:
        key_buffer = ctypes.create_string_buffer(struct.pack("<Q", key), 8)
        self._bpf(_MAP_DELETE_ELEM, struct.pack("<IIQ", self.map_fd, 0, ctypes.addressof(key_buffer)))

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            _close(fd)


def _close(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass


def _queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def _counters(sock: socket.socket) -> tuple[int, int]:
    """(bytes written into this socket so far, bytes it received so far, a FIN counting one).

    The acked count is read before the queue: an ACK between the two reads makes the sum short,
    never long, so a FIN is forwarded late rather than before the bytes it follows."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    acked, received = struct.unpack_from("<QQ", info, 120)
    return acked + _queued(sock, _SIOCOUTQ), received


def _baseline(sock: socket.socket) -> tuple[int, int]:
    """Where counting starts: (bytes written so far, bytes received and read so far), exact.

    Here a short sum would be the dangerous side (it would count bytes as moved that were not),
    so both are read between two looks at the queues, again until nothing moved meanwhile. Bytes
    received but still waiting to be read have not moved: they count as coming after the start."""
    for _ in range(BASELINE_TRIES):
        queues = (_queued(sock, _SIOCOUTQ), _queued(sock, _SIOCINQ))
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if (_queued(sock, _SIOCOUTQ), _queued(sock, _SIOCINQ)) == queues:
            acked, received = struct.unpack_from("<QQ", info, 120)
            return acked + queues[0], received - queues[1]
    raise OSError(errno.EAGAIN, "its counters kept moving")


class Declined(NamedTuple):
    """A connection left to the splice engine: the first bytes it still owes each side, and how many
    the carrier sent already (its totals must count them)."""

    to_upstream_first: bytes
    to_client_first: bytes
    sent_up: int
    sent_down: int


class Carried:
    """One connection the kernel carries. Sides: 0 the client, 1 the upstream (as relay.ends.RESET_BY)."""

    __slots__ = ("socks", "token", "cookies", "first", "written_base", "received_base", "fin", "forwarded",
                 "last_moved", "last_active", "idle_timeout", "half_closed_timeout",
                 "ended")  # fmt: skip

    def __init__(self, socks, token, first, idle_timeout, half_closed_timeout, now):
        self.socks = socks
        self.token = token
        self.cookies = [0, 0]
        self.first = first  # bytes the relay wrote itself before storing the sockets, per direction
        self.written_base = [0, 0]
        self.received_base = [0, 0]
        self.fin = [False, False]  # a FIN came from this side
        self.forwarded = [False, False]  # ...and went on to the other
        # Per direction at the last sweep, as moved() says: (came, went). Only sweep() sets it, so that
        # reading the counters elsewhere (counts(), held FINs) cannot hide traffic from the idle timeout.
        self.last_moved = [(0, 0), (0, 0)]
        self.last_active = now
        self.idle_timeout = idle_timeout
        self.half_closed_timeout = half_closed_timeout
        self.ended = False

    def take_baselines(self) -> None:
        for side, sock in enumerate(self.socks):
            self.written_base[side], self.received_base[side] = _baseline(sock)

    def moved(self) -> tuple[list[int], list[int]]:
        """Per direction (from each side): bytes received from that side, bytes written on to the other
        (a FIN counts one in both counters: not here)."""
        written, received = [0, 0], [0, 0]
        for side, sock in enumerate(self.socks):
            written[side], received[side] = _counters(sock)
        came = [received[side] - self.received_base[side] - self.fin[side] for side in (0, 1)]
        went = [written[1 - side] - self.written_base[1 - side] - self.forwarded[side] for side in (0, 1)]
        return came, went

    def sent(self) -> tuple[int, int]:
        """(bytes sent up, bytes sent down) so far, the relay's own first bytes included."""
        try:
            _came, went = self.moved()
        except OSError:
            went = [0, 0]
        return self.first[0] + went[0], self.first[1] + went[1]


class KernelCarrier:
    """Carries connections through a Sockmap; ``on_finished`` gets lists of (token, ended, up, down)."""

    def __init__(self, on_finished, max_backlog: int = MAX_BACKLOG):
        self.sockmap = Sockmap()
        self.max_backlog = max_backlog
        self.on_finished = on_finished
        self.epoll = select.epoll()
        self.by_fd: dict[int, tuple[Carried, int]] = {}
        self.carried: set[Carried] = set()
        self.draining: set[Carried] = set()  # with a FIN held until the bytes before it went on
        self.failed: list[tuple[Carried, str]] = []  # taken by add(), to be ended at once
        self.wake_drainer = trio.Event()

    def __len__(self) -> int:
        return len(self.carried)

    def add(self, client, upstream, token, idle_timeout, half_closed_timeout, to_upstream_first, to_client_first):
        """Take the connection (None), or decline it: a Declined says what the splice engine owes
        still and what this already sent.

        The order keeps every byte in place. The first bytes go out before anything is stored. The
        client, which waits for an answer to them, is stored first; until its upstream is stored
        too, bytes from the client would come up to the relay (none are expected). The upstream's
        answer may come meanwhile: it waits in the upstream's queue, where the relay forwards it
        itself, then stores the upstream.
        """
        views = (socket.socket(fileno=client.fileno()), socket.socket(fileno=upstream.fileno()))
        declined = Declined(to_upstream_first, to_client_first, 0, 0)
        try:
            if self._takes(views):
                declined = self._write_first(views, to_upstream_first, to_client_first)
                if not declined.to_upstream_first and not declined.to_client_first:
                    connection = self._store_client(views, token, idle_timeout, half_closed_timeout, declined)
                    forwarded, failure = self._store_upstream(connection)
                    if failure == _DECLINED:
                        try:
                            self.sockmap.remove(connection.cookies[1])  # nothing went through the client yet
                        except OSError as exc:
                            failure = ends.local_failure(exc.errno)
                    if failure != _DECLINED:
                        self._carry(connection, client, upstream, failure)
                        return None
                    declined = declined._replace(sent_down=declined.sent_down + forwarded)
        except OSError as exc:  # before the client was stored
            log.debug("sockmap declined a connection: %s", exc)
        for view in views:
            view.detach()  # the caller's sockets keep their fds
        return declined

    def _takes(self, views) -> bool:
        """Room in the map, both sockets established (it takes nothing else), nothing queued from the
        client (bytes queued before a socket is stored would wait there for its next segment)."""
        return (
            len(self.carried) * 2 + 2 <= CAPACITY and all(map(_established, views)) and not _queued(views[0], _SIOCINQ)
        )

    def _store_client(self, views, token, idle_timeout, half_closed_timeout, declined) -> "Carried":
        connection = Carried(views, token, (declined.sent_up, declined.sent_down),
                             idle_timeout, half_closed_timeout, trio.current_time())  # fmt: skip
        connection.take_baselines()
        connection.cookies = [struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8))[0]
                              for sock in views]  # fmt: skip
        self.sockmap.store(views[0].fileno(), connection.cookies[1])  # found by the upstream's segments
        return connection

    def _store_upstream(self, connection: Carried) -> tuple[int, str | None]:
        """Forward what the upstream said meanwhile, then store it: (bytes forwarded, None or how the
        connection ends, or _DECLINED: the upstream's FIN came, the map would refuse it)."""
        try:
            return self._forward_then_store(connection)
        except OSError as exc:
            return 0, ends.local_failure(exc.errno)

    def _forward_then_store(self, connection: Carried) -> tuple[int, str | None]:
        client, upstream = connection.socks
        forwarded = 0
        for attempt in range(FORWARD_TRIES):
            if attempt and not (_established(upstream) and _settles(connection)):
                # It was stored: bytes it redirected may wait to be sent through the client, so the
                # client cannot be taken out, nor bytes written to it past them.
                return forwarded, ends.STORE_RACE
            if not _established(upstream):
                return forwarded, ends.STORE_RACE if _spoke(client) else _DECLINED
            for _ in range(FORWARD_TRIES):
                waiting = _queued(upstream, _SIOCINQ)
                if not waiting:
                    break
                data = upstream.recv(waiting, socket.MSG_DONTWAIT)  # nothing is redirected to the client yet
                sent = client.send(data, socket.MSG_DONTWAIT)
                forwarded += sent
                if sent != len(data):
                    return forwarded, ends.STORE_RACE
            else:
                return forwarded, ends.STORE_RACE  # it keeps talking
            received = _counters(upstream)[1]
            try:
                self.sockmap.store(upstream.fileno(), connection.cookies[0])  # found by the client's segments
            except OSError:  # its FIN came since the look above
                return forwarded, ends.STORE_RACE if _spoke(client) else _DECLINED
            if _spoke(client):
                # Bytes from the client before this store came up to the relay, and later ones may
                # already have gone on: their order is lost.
                return forwarded, ends.STORE_RACE
            if _counters(upstream)[1] == received or _counters(client)[1] != connection.received_base[0]:
                return forwarded, None  # nothing came around the store; or the sweep watches (see there)
            # The upstream's bytes came around the store: they go on (often an answer to the first
            # bytes, on its way), or wait stuck if they came just before it.
            if _settles(connection):
                return forwarded, None
            # Taken out again, it shows stuck ones; nothing waits to be sent through it (the client is silent).
            self.sockmap.remove(connection.cookies[0])
        return forwarded, ends.STORE_RACE

    def _carry(self, connection: Carried, client, upstream, failure: str | None) -> None:
        """The connection is the carrier's now (both sockets' fds); a failure ends it soon."""
        client.detach()
        upstream.detach()
        self.carried.add(connection)
        try:
            for side, sock in enumerate(connection.socks):
                self.by_fd[sock.fileno()] = (connection, side)
                self.epoll.register(sock.fileno(), select.EPOLLRDHUP | select.EPOLLET)
        except OSError as exc:
            failure = failure or ends.local_failure(exc.errno)
        if failure:
            self.failed.append((connection, failure))  # ended by the drainer: not before the caller is done
            self.wake_drainer.set()

    @staticmethod
    def _write_first(views, to_upstream_first: bytes, to_client_first: bytes) -> "Declined":
        """Write each side's first bytes: what is left of them (nothing when all went), what went."""
        owed = [to_upstream_first, to_client_first]
        for side, sock in ((0, views[1]), (1, views[0])):
            while owed[side]:
                try:
                    owed[side] = owed[side][sock.send(owed[side], socket.MSG_DONTWAIT) :]
                except OSError:  # full, or failed: the engine carries on from here and meets the error itself
                    break
        return Declined(*owed, len(to_upstream_first) - len(owed[0]), len(to_client_first) - len(owed[1]))

    async def run(self) -> None:
        """Handle FINs and resets as they come, and sweep for backlogs and timeouts, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sweep_forever)
            nursery.start_soon(self.drain_forever)
            while True:
                try:
                    await trio.lowlevel.wait_readable(self.epoll.fileno())
                except trio.ClosedResourceError:  # close() from another task
                    nursery.cancel_scope.cancel()
                    return
                for fd, events in self.epoll.poll(0):
                    entry = self.by_fd.get(fd)
                    if entry is not None:
                        self.event(*entry, events)

    def event(self, connection: Carried, side: int, events: int) -> None:
        if connection.ended:
            return
        if events & select.EPOLLERR:
            code = connection.socks[side].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            # A FIN coming in on the peer is redirected here as an empty segment, which fails
            # with EPIPE and is reported as this socket's error; nothing was lost.
            if code not in (0, errno.EPIPE):
                self.finish(connection, ends.RESET_BY[side], reset=True)
                return
        if events & (select.EPOLLRDHUP | select.EPOLLHUP) and not connection.fin[side]:
            connection.fin[side] = True
            connection.last_active = trio.current_time()
            self.draining.add(connection)
            self.forward_fins(connection)
            self.wake_drainer.set()

    def forward_fins(self, connection: Carried) -> None:
        """Forward each FIN whose bytes before it all went on; finish once both did."""
        try:
            came, went = connection.moved()
            for side in (0, 1):
                if connection.fin[side] and not connection.forwarded[side] and went[side] >= came[side]:
                    connection.socks[1 - side].shutdown(socket.SHUT_WR)
                    connection.forwarded[side] = True
        except OSError as exc:
            self.finish(connection, ends.local_failure(exc.errno), reset=True)
            return
        if all(connection.forwarded):
            self.finish(connection, ends.CLOSED, reset=False)
        elif connection.forwarded == connection.fin:
            self.draining.discard(connection)

    async def drain_forever(self) -> None:
        while True:
            await self.wake_drainer.wait()
            self.wake_drainer = trio.Event()
            while self.failed:
                self.finish(*self.failed.pop(), reset=True)
            while self.draining:
                await trio.sleep(DRAIN_CHECK)
                for connection in list(self.draining):
                    self.forward_fins(connection)

    async def sweep_forever(self) -> None:
        while True:
            await trio.sleep(SWEEP)
            now = trio.current_time()
            for connection in list(self.carried):
                self.sweep(connection, now)

    def sweep(self, connection: Carried, now: float) -> None:
        try:
            came, went = connection.moved()
        except OSError as exc:
            self.finish(connection, ends.local_failure(exc.errno), reset=True)
            return
        if came != [came_before for came_before, _ in connection.last_moved]:
            connection.last_active = now
        silent = now - connection.last_active
        backlog = [came[0] - went[0], came[1] - went[1]]
        # Nothing came and nothing went on since the last sweep, though some waits.
        stuck = [backlog[side] > 0 and (came[side], went[side]) == connection.last_moved[side] for side in (0, 1)]
        connection.last_moved = list(zip(came, went, strict=True))
        if max(backlog) > self.max_backlog:
            self.finish(connection, ends.BACKLOG_FULL, reset=True)
        elif any(stuck[side] and not _queued(connection.socks[1 - side], _SIOCOUTQ) for side in (0, 1)):
            # Bytes that came between the last look at a queue and its socket's store wait for
            # a next segment that may never come; nothing can move them without losing others.
            self.finish(connection, ends.STORE_RACE, reset=True)
        elif any(connection.fin) and silent >= connection.half_closed_timeout:
            self.finish(connection, ends.HALF_CLOSED_TIMEOUT, reset=True)
        elif silent >= connection.idle_timeout:
            self.finish(connection, ends.IDLE_TIMEOUT, reset=True)

    def reclaim(self, ended: str) -> bool:
        """End the connection idle longest whose client never sent a byte (as Engine.reclaim): whether one was."""
        silent = []
        for connection in self.carried:
            try:
                if not connection.first[0] and _counters(connection.socks[0])[1] == connection.received_base[0]:
                    silent.append(connection)
            except OSError:
                continue
        if not silent:
            return False
        self.finish(min(silent, key=lambda connection: connection.last_active), ended, reset=True)
        return True

    def counts(self) -> list:
        return [(connection.token, *connection.sent()) for connection in self.carried]

    def finish(self, connection: Carried, ended: str, *, reset: bool) -> None:
        if connection.ended:
            return
        connection.ended = True
        sent_up, sent_down = connection.sent()
        self.carried.discard(connection)
        self.draining.discard(connection)
        for sock in connection.socks:
            fd = sock.fileno()
            if self.by_fd.pop(fd, None) is not None:
                self.epoll.unregister(fd)
            if reset:  # closing also takes it out of the map
                sockets.reset(sock)
            else:
                sock.close()
        self.on_finished([(connection.token, ended, sent_up, sent_down)])

    def close(self) -> None:
        """Reset every connection left (ended ends.CANCELLED), then free the kernel's objects."""
        for connection in list(self.carried):
            self.finish(connection, ends.CANCELLED, reset=True)
        trio.lowlevel.notify_closing(self.epoll.fileno())
        self.epoll.close()
        self.sockmap.close()


def _all_gone_on(connection: "Carried") -> bool:
    """Whether every byte the upstream gave up since the start (read by the relay, or redirected) is in
    the client's send queue or acknowledged: nothing waits between them. Errs towards no."""
    client, upstream = connection.socks
    received = _counters(upstream)[1] - _queued(upstream, _SIOCINQ) - connection.received_base[1]
    return received == _counters(client)[0] - connection.written_base[0]


def _settles(connection: "Carried") -> bool:
    """Whether _all_gone_on becomes true within SETTLE_WAIT: the kernel's worker sends redirected bytes
    on soon after they come. Blocks (briefly, and only when bytes came while the upstream was stored)."""
    deadline = time.monotonic() + SETTLE_WAIT
    while not _all_gone_on(connection):
        if time.monotonic() > deadline:
            return False
        time.sleep(SETTLE_WAIT / 20)
    return True


def _established(sock: socket.socket) -> bool:
    """The map takes nothing else (a socket that has its peer's FIN is not)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED


def _spoke(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False  # nothing, or an error epoll reports
