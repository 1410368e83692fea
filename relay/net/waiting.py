"""Accepted connections waiting for their client's first bytes, without a task each.

The relay reads a client's first bytes (TLS SNI, an HTTP Host) before it
opens the tunnel, and waits up to --sniff-timeout for them; a client of a
protocol where the server speaks first (SSH, SMTP) sends nothing and is
connected by address after that wait. A Trio task waiting per connection
costs about 6 KiB (the task, its coroutine frames, a cancel scope), and when
thousands of clients connect at once that peak stays behind as a fragmented
heap. Here a waiting connection is an epoll registration and a heap entry;
it leaves once the client sends something (or a FIN, or a reset) or its
wait is over. Silent connections whose waits end together (their clients
connected together) start SILENT_AT_ONCE at a time: they would otherwise
all be dialing at once, the same peak again. While none of the
dials under way has finished for PATIENCE (a blackholed destination), the
connections that have waited that long for their turn start anyway: slow
dials hold back everyone else's only so long.
"""

import collections
import heapq
import itertools
import math
import select

import trio

MAX_EVENTS = 256  # per epoll_wait; more wait for the next pass
SILENT_AT_ONCE = 64  # silent connections between start and done_silent()
PATIENCE = 0.25  # seconds without a finished dial after which waiting for a turn stops


class _Waiting:
    __slots__ = ("conn", "admitted")

    def __init__(self, conn, admitted):
        self.conn, self.admitted = conn, admitted


class WaitingRoom:
    """``start(conn, admitted, spoke)`` is called once per connection that leaves: ``spoke`` is
    True if the client sent something (or closed), False if its wait ran out; whoever goes on with
    a silent one calls ``done_silent()`` once it has dialed (or failed). ``close()`` hands every
    connection still here to ``abandon(conn, admitted)`` instead."""

    def __init__(self, start, abandon, silent_at_once: int = SILENT_AT_ONCE):
        self._start, self._abandon = start, abandon
        # Silent connections waiting for a turn to start, as (entry, when it starts regardless).
        self._due: collections.deque[tuple[_Waiting, float]] = collections.deque()
        self._silent_started, self._silent_at_once = 0, silent_at_once
        self._last_done = -math.inf  # when a silent connection's task last finished dialing
        self._epoll = select.epoll()
        self._waiting: dict[int, _Waiting] = {}  # fd -> its entry
        self._deadlines: list = []  # heap of (deadline, order, entry); entries that left are skipped
        self._order = itertools.count()
        self._alarm: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._waiting) + len(self._due)

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def add(self, conn, admitted, deadline: float) -> None:
        """Wait for ``conn`` (a stdlib socket) to be readable, until ``deadline`` (Trio's clock)."""
        entry = _Waiting(conn, admitted)
        fd = conn.fileno()
        # One-shot: the connection leaves at its first event; start() reads what came.
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)
        self._waiting[fd] = entry
        heapq.heappush(self._deadlines, (deadline, next(self._order), entry))
        if self._alarm is not None and deadline < self._alarm.deadline:
            self._alarm.deadline = deadline  # e.g. a reload shortened --sniff-timeout

    async def run(self) -> None:
        """Start the task of each connection whose client spoke or whose wait is over, until close()."""
        while not self._epoll.closed:
            deadline = min(
                self._deadlines[0][0] if self._deadlines else math.inf,
                max(self._due[0][1], self._last_done + PATIENCE) if self._due else math.inf,
            )
            with trio.CancelScope(deadline=deadline) as self._alarm:
                try:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                except trio.ClosedResourceError:
                    return
            self._alarm = None
            if self._epoll.closed:
                return
            for fd, _ in self._epoll.poll(0, MAX_EVENTS):
                self._spoke(fd)
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, entry = heapq.heappop(self._deadlines)
                fd = entry.conn.fileno()
                if self._waiting.get(fd) is entry:
                    del self._waiting[fd]
                    self._epoll.unregister(fd)
                    self._due.append((entry, now + PATIENCE))
            self._start_due()

    def _spoke(self, fd: int) -> None:
        entry = self._waiting.pop(fd)
        self._epoll.unregister(fd)
        self._start(entry.conn, entry.admitted, True)

    def _start_due(self) -> None:
        now = trio.current_time()
        stalled = now - self._last_done >= PATIENCE
        while self._due and (self._silent_started < self._silent_at_once or (stalled and self._due[0][1] <= now)):
            entry, _ = self._due.popleft()
            self._silent_started += 1
            self._start(entry.conn, entry.admitted, False)

    def done_silent(self) -> None:
        """A task started for a silent connection has dialed, or failed: the next may start."""
        self._silent_started -= 1
        self._last_done = trio.current_time()
        if not self._epoll.closed:
            self._start_due()

    def close(self) -> None:
        """Stop waiting: every connection still here goes to ``abandon``."""
        if self._epoll.closed:
            return
        trio.lowlevel.notify_closing(self._epoll.fileno())  # wakes run(), if it waits
        self._epoll.close()
        left = [*self._waiting.values(), *(entry for entry, _ in self._due)]
        self._waiting, self._deadlines, self._due = {}, [], collections.deque()
        for entry in left:
            self._abandon(entry.conn, entry.admitted)
