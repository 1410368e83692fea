"""A TCP delay line: a far link's round trip (and optionally its bandwidth), emulated where the
kernel has no netem (nor the fq qdisc that would honour an eBPF-set departure time).

    python -m relay.lab.delayline LISTEN_ADDR:PORT TARGET_ADDR:PORT ONE_WAY_MS [RATE_MBIT]

Accepts connections on LISTEN, opens one to TARGET for each, and passes the bytes both ways,
each chunk held back ONE_WAY_MS after it was read: a request and its answer cross it in twice
that, on top of the lab's own path. With RATE_MBIT, each direction of the link (all its
connections together) is paced to that rate, like a slow line would. A direction of one
connection holds at most MAX_HELD_BYTES in flight (its window): past that it stops reading and
TCP pushes back, so one stream moves at most MAX_HELD_BYTES per one-way delay. Closing one side
(FIN) is passed on after the delay too; a reset or error closes both. Runs until killed.

The kernel completes the client's TCP handshake with the line at once, so the line plays the far
one's round trip itself: it connects to TARGET one delay after accepting (the SYN's way there),
and passes the client's first bytes on no sooner than a real client could have sent them, one
round trip after its connect, so a connect across the line costs what it would across the link.

The bytes never enter this process: each direction of a connection holds them in a pipe, moved
in and out with splice(2), and the process only keeps the book of how many bytes are due when
(:class:`Held`, no I/O). One epoll loop serves every connection; per byte it costs next to
nothing, so the line carries Gbit/s instead of capping the lab at the few hundred Mbit/s a
user-space copy loop managed.

Put it in front of the far host's sshd and proxies (:func:`relay.lab.services.start_delay_line`),
and point ``ssh`` or the relay at it: everything crossing it then pays the far link's round trip.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
import time
from collections import deque
from pathlib import Path

CHUNK = 1 << 20  # at most this per splice when the rate is not capped
PACED_CHUNK = 65536  # ... and when it is: the burst one read may put on the line
MAX_HELD_BYTES = 16 << 20  # per direction of a connection: 1.3 Gbit/s per stream at 50 ms one way
# Spliced bytes sit in pipes as page fragments, often less than a page each: room for twice the
# held bytes in whole pages, pipe after pipe.
MAX_PIPES = 32
F_SETPIPE_SZ = 1031
SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
BACKLOG = 1024
# Bulk: a read that found this much waits BULK_READ_GAP before the next, so that a fast stream is
# moved in fewer, larger splices; a small read (a request, an answer) is never held up by it.
BULK_READ = 32768
BULK_READ_GAP = 0.0005
GRANULE = 0.001  # bytes read within this of each other may leave together (that much late at most)


class Pacer:
    """One direction of the link's bandwidth, shared by its connections: each chunk is given the
    next free slot of the line, as long as its size takes at the rate."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.bytes_per_second = bytes_per_second
        self.free_at = 0.0

    def take(self, size: int, now: float) -> float:
        """When a chunk of ``size`` bytes read at ``now`` has entered the link (its slot's end)."""
        if self.bytes_per_second is None:
            return now
        self.free_at = max(now, self.free_at) + size / self.bytes_per_second
        return self.free_at


class Held:
    """One direction of one connection, as a book (no I/O): how many of the bytes read are due to
    leave when, in order; a count of 0 is the end (FIN)."""

    def __init__(self, delay: float, pacer: Pacer, not_before: float = 0.0) -> None:
        self.delay = delay
        self.pacer = pacer
        self.not_before = not_before  # nothing leaves before this
        self.queue: deque[list] = deque()  # [due, bytes left to send, due of its first byte]
        self.bytes_held = 0
        self.read_after = 0.0  # a capped rate's next free slot: no reading before it
        self.ended = False  # the end was read
        self.done = False  # the end was passed on

    def may_read(self, now: float) -> bool:
        return not self.ended and self.bytes_held < MAX_HELD_BYTES and now >= self.read_after

    def room(self) -> int:
        """How many bytes one read may take."""
        chunk = CHUNK if self.pacer.bytes_per_second is None else PACED_CHUNK
        return max(0, min(chunk, MAX_HELD_BYTES - self.bytes_held))

    def took(self, size: int, now: float) -> None:
        """``size`` bytes were read at ``now`` (0: the end). The link's bandwidth is spent as the
        bytes enter it; the delay starts after."""
        entered = now
        if size:
            entered = self.pacer.take(size, now)
            if self.pacer.bytes_per_second is not None:
                self.read_after = entered
            elif size >= BULK_READ:
                self.read_after = now + BULK_READ_GAP
        else:
            self.ended = True
        due = max(entered, self.not_before) + self.delay
        self.bytes_held += size
        if size and self.queue:
            tail = self.queue[-1]
            # Bytes read soon after the tail's leave with it, up to GRANULE late: fewer, larger writes.
            if tail[1] and tail[0] > now and due - tail[2] <= GRANULE:
                tail[0] = due
                tail[1] += size
                return
        self.queue.append([due, size, due])

    def due(self, now: float) -> int | None:
        """How many bytes may leave now (0: the end may), or None if nothing is due."""
        if self.queue and self.queue[0][0] <= now:
            return self.queue[0][1]
        return None

    def sent(self, size: int) -> None:
        """``size`` of the due bytes left (0: the end did)."""
        head = self.queue[0]
        if not size:
            if head[1]:
                raise ValueError("the end passed on before the bytes ahead of it")
            self.queue.popleft()
            self.done = True
            return
        if size > head[1]:
            raise ValueError(f"sent {size} bytes of {head[1]} due")
        head[1] -= size
        self.bytes_held -= size
        if not head[1]:
            self.queue.popleft()

    def next_time(self, now: float) -> float | None:
        """The next moment something changes without I/O: the head falls due, or a paced read may go."""
        times = [self.queue[0][0]] if self.queue else []
        if not self.ended and self.read_after > now and self.bytes_held < MAX_HELD_BYTES:
            times.append(self.read_after)
        return min(times, default=None)


def pipe_max_bytes() -> int:
    """The most one pipe may hold without CAP_SYS_RESOURCE (fs.pipe-max-size)."""
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return 1 << 20


class Pipes:
    """A chain of pipes, used as one FIFO of spliced bytes: one pipe holds at most
    fs.pipe-max-size (1 MiB here) and only as many page fragments as it has slots."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chain: deque[list[int]] = deque()  # [read end, write end, bytes in it]
        self.add()

    def add(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, self.size)
        except PermissionError:
            pass  # over the user's pipe quota: the default size still works
        self.chain.append([read_end, write_end, 0])

    def fill_from(self, source: int, limit: int) -> int | None:
        """Splice up to ``limit`` bytes from ``source`` (0 at its end); None if nothing came: the
        source had nothing, or the pipes are full."""
        for _ in range(2):
            tail = self.chain[-1]
            try:
                size = os.splice(source, tail[1], limit, flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if not tail[2] or len(self.chain) >= MAX_PIPES:
                    return None  # an empty pipe had room: the source had nothing
                self.add()  # the tail pipe is full: the next one takes the rest
                continue
            tail[2] += size
            return size
        return None

    def drain_to(self, sink: int, limit: int) -> int:
        """Splice up to ``limit`` bytes (at most what the pipes hold) into ``sink``; BlockingIOError if it is full."""
        head = self.chain[0]
        while not head[2] and len(self.chain) > 1:
            self.chain.popleft()
            os.close(head[0])
            os.close(head[1])
            head = self.chain[0]
        size = os.splice(head[0], sink, min(limit, head[2]), flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        head[2] -= size
        return size

    def close(self) -> None:
        for read_end, write_end, _ in self.chain:
            os.close(read_end)
            os.close(write_end)
        self.chain.clear()


class Direction:
    """One direction of one connection: ``source`` into pipes, the pipes into ``sink``, by the book."""

    def __init__(self, source: socket.socket, sink: socket.socket, held: Held, pipe_size: int) -> None:
        self.source, self.sink, self.held = source, sink, held
        self.pipes = Pipes(pipe_size)
        self.pipes_full = False  # a read found no room in the pipes: wait until some leaves
        self.want_write = False  # the sink was full: wait until it is writable

    def wants_read(self, now: float) -> bool:
        return not self.pipes_full and self.held.may_read(now)

    def read(self, now: float) -> None:
        """Move what the source has into the pipes; OSError if the source failed."""
        size = self.pipes.fill_from(self.source.fileno(), self.held.room())
        if size is None:
            # Nothing came though the source looked readable: full pipes, if they hold anything.
            self.pipes_full = self.held.bytes_held > 0
            return
        self.held.took(size, now)

    def write(self, now: float) -> None:
        """Pass on what is due; OSError if the sink failed."""
        while not self.want_write and (size := self.held.due(now)) is not None:
            if not size:
                self.sink.shutdown(socket.SHUT_WR)
                self.held.sent(0)
                return
            try:
                moved = self.pipes.drain_to(self.sink.fileno(), size)
            except BlockingIOError:
                self.want_write = True
                return
            self.held.sent(moved)
            self.pipes_full = False

    def next_time(self, now: float) -> float | None:
        return None if self.want_write else self.held.next_time(now)

    def close(self) -> None:
        self.pipes.close()


class Connection:
    def __init__(
        self, client: socket.socket, target: tuple[str, int], delay: float, pacers: tuple[Pacer, Pacer], pipe_size: int
    ) -> None:
        accepted = time.monotonic()
        self.client = client
        self.target = target
        self.connect_at = accepted + delay  # the SYN crossing the link
        self.server: socket.socket | None = None
        self.connected = False
        # The client could send only once the SYN-ACK came back: a round trip after its connect.
        self.up = Held(delay, pacers[0], not_before=accepted + 2 * delay)
        self.down = Held(delay, pacers[1])
        self.pipe_size = pipe_size
        self.directions: list[Direction] = []
        self.closed = False

    def start_connect(self) -> None:
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        self.server = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = self.server.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))

    def finish_connect(self) -> None:
        assert self.server is not None
        code = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        self.connected = True
        self.directions = [
            Direction(self.client, self.server, self.up, self.pipe_size),
            Direction(self.server, self.client, self.down, self.pipe_size),
        ]

    @property
    def finished(self) -> bool:
        return self.connected and self.up.done and self.down.done

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for direction in self.directions:
            direction.close()
        self.client.close()
        if self.server is not None:
            self.server.close()

    def next_time(self, now: float) -> float | None:
        if self.server is None:
            return self.connect_at
        times = [t for d in self.directions if (t := d.next_time(now)) is not None]
        return min(times, default=None)

    def interest(self, now: float) -> dict[socket.socket, int]:
        """What to wait for on each socket."""
        if self.server is None:
            return {}
        if not self.connected:
            return {self.server: select.EPOLLOUT}
        masks = {self.client: 0, self.server: 0}
        for direction in self.directions:
            if direction.wants_read(now):
                masks[direction.source] |= select.EPOLLIN
            if direction.want_write:
                masks[direction.sink] |= select.EPOLLOUT
        return masks

    def on_event(self, sock: socket.socket, events: int, now: float) -> None:
        if not self.connected:
            self.finish_connect()
            return
        for direction in self.directions:
            if direction.sink is sock and events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                direction.want_write = False
            if direction.source is sock and events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                if direction.wants_read(now):
                    direction.read(now)

    def pump(self, now: float) -> None:
        if self.server is None:
            if now >= self.connect_at:
                self.start_connect()
            return
        for direction in self.directions:
            direction.write(now)


def endpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


class DelayLine:
    """The epoll loop: accepts on ``listener`` and carries every connection."""

    def __init__(self, listener: socket.socket, target: tuple[str, int], delay: float, rate: float | None) -> None:
        self.listener = listener
        self.target = target
        self.delay = delay
        self.pacers = (Pacer(rate), Pacer(rate))
        self.pipe_size = pipe_max_bytes()
        self.epoll = select.epoll()
        self.epoll.register(listener.fileno(), select.EPOLLIN)
        self.connections: set[Connection] = set()
        self.owner: dict[int, tuple[Connection, socket.socket]] = {}
        self.registered: dict[int, int] = {}  # fd -> the mask epoll waits for

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # e.g. the client reset while queued
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections.add(Connection(client, self.target, self.delay, self.pacers, self.pipe_size))

    def drop(self, connection: Connection) -> None:
        for sock in (connection.client, connection.server):
            if sock is not None and sock.fileno() >= 0:
                fd = sock.fileno()
                if self.registered.pop(fd, None) is not None:
                    self.epoll.unregister(fd)
                self.owner.pop(fd, None)
        connection.close()
        self.connections.discard(connection)

    def watch(self, now: float) -> None:
        """Tell epoll what each socket waits for now; a socket that waits for nothing is left out,
        so a hang-up it cannot act on yet does not wake the loop again and again."""
        for connection in self.connections:
            for sock, mask in connection.interest(now).items():
                fd = sock.fileno()
                self.owner[fd] = (connection, sock)
                current = self.registered.get(fd, 0)
                if mask == current:
                    continue
                if not mask:
                    self.epoll.unregister(fd)
                    del self.registered[fd]
                elif not current:
                    self.epoll.register(fd, mask)
                    self.registered[fd] = mask
                else:
                    self.epoll.modify(fd, mask)
                    self.registered[fd] = mask

    def step(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections):
            try:
                connection.pump(now)
            except OSError:
                self.drop(connection)
                continue
            if connection.finished:
                self.drop(connection)
        self.watch(now)
        times = [t for c in self.connections if (t := c.next_time(now)) is not None]
        timeout = max(0.0, min(times) - now) if times else -1
        # epoll counts whole milliseconds: round up rather than wake early and spin.
        events = self.epoll.poll(-1 if timeout < 0 else (int(timeout * 1000) + 1) / 1000 if timeout else 0)
        now = time.monotonic()
        for fd, mask in events:
            if fd == self.listener.fileno():
                self.accept()
                continue
            owned = self.owner.get(fd)
            if owned is None or owned[0].closed:
                continue
            connection, sock = owned
            try:
                connection.on_event(sock, mask, now)
            except OSError:
                self.drop(connection)


def main(listen: tuple[str, int], target: tuple[str, int], delay: float, rate_mbit: float | None) -> None:
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    listener = socket.create_server(listen, family=family, backlog=BACKLOG)
    listener.setblocking(False)
    rate = None if rate_mbit is None else rate_mbit * 1e6 / 8
    capped = "" if rate_mbit is None else f", {rate_mbit:g} Mbit/s each way"
    route = f"{listen[0]}:{listen[1]} -> {target[0]}:{target[1]}"
    print(f"delay line {route}, {delay * 1000:g} ms each way{capped}", flush=True)
    line = DelayLine(listener, target, delay, rate)
    while True:
        line.step()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    rate_mbit = float(sys.argv[4]) if len(sys.argv) == 5 else None
    try:
        main(endpoint(sys.argv[1]), endpoint(sys.argv[2]), float(sys.argv[3]) / 1000, rate_mbit)
    except KeyboardInterrupt:
        pass
