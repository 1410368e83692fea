"""Accepted connections waiting for their client's first bytes, without a task each.

The relay reads a client's first bytes (TLS SNI, an HTTP Host) before it
opens the tunnel, and waits up to --sniff-timeout for them; a client of a
protocol where the server speaks first (SSH, SMTP) sends nothing and is
connected by address after that wait. A Trio task waiting per connection
costs about 6 KiB (the task, its coroutine frames, a cancel scope), and when
thousands of clients connect at once that peak stays behind as a fragmented
heap. Here a waiting connection is a watched socket and a timer in a
ReadinessLoop (relay.net.readiness); it leaves once the client sends
something (or a FIN, or a reset) or its wait is over. Silent connections
whose waits end together (their clients connected together) start
SILENT_AT_ONCE at a time: they would otherwise all be dialing at once, the
same peak again. While none of the
dials under way has finished for PATIENCE (a blackholed destination), the
connections that have waited that long for their turn start anyway: slow
dials hold back everyone else's only so long.
"""

import collections
import math
import select

import trio

from relay.net.readiness import ReadinessLoop, Timer

SILENT_AT_ONCE = 64  # silent connections between start and done_silent()
PATIENCE = 0.25  # seconds without a finished dial after which waiting for a turn stops


class _Waiting:
    __slots__ = ("conn", "admitted", "timer")

    def __init__(self, conn, admitted):
        self.conn, self.admitted = conn, admitted
        self.timer: Timer | None = None  # the end of its wait


class WaitingRoom:
    """``start(conn, admitted, spoke)`` is called once per connection that leaves: ``spoke`` is
    True if the client sent something (or closed), False if its wait ran out; whoever goes on with
    a silent one calls ``done_silent()`` once it has dialed (or failed). ``close()`` hands every
    connection still here to ``abandon(conn, admitted)`` instead."""

    def __init__(self, start, abandon, silent_at_once: int = SILENT_AT_ONCE):
        self._start, self._abandon = start, abandon
        self._loop = ReadinessLoop()
        self._waiting: dict[int, _Waiting] = {}  # fd -> its entry, while its client may still speak
        # Silent connections waiting for a turn to start, as (entry, when it starts regardless).
        self._due: collections.deque[tuple[_Waiting, float]] = collections.deque()
        self._silent_started, self._silent_at_once = 0, silent_at_once
        self._last_done = -math.inf  # when a silent connection's task last finished dialing
        self._patience_timer: Timer | None = None  # for the first of _due, while it waits for a turn

    def __len__(self) -> int:
        return len(self._waiting) + len(self._due)

    @property
    def closed(self) -> bool:
        return self._loop.closed

    def add(self, conn, admitted, deadline: float) -> None:
        """Wait for ``conn`` (a stdlib socket) to be readable, until ``deadline`` (Trio's clock)."""
        entry = _Waiting(conn, admitted)
        fd = conn.fileno()
        # One-shot: the connection leaves at its first event; start() reads what came.
        self._loop.watch(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT, self._spoke, entry)
        self._waiting[fd] = entry
        entry.timer = self._loop.call_at(deadline, self._silent, entry)

    async def run(self) -> None:
        """Start the task of each connection whose client spoke or whose wait is over, until close()."""
        await self._loop.run()

    def _spoke(self, entry: _Waiting) -> None:
        self._leave(entry)
        self._start(entry.conn, entry.admitted, True)

    def _silent(self, entry: _Waiting) -> None:
        self._leave(entry)
        self._due.append((entry, trio.current_time() + PATIENCE))
        self._start_due()

    def _leave(self, entry: _Waiting) -> None:
        fd = entry.conn.fileno()
        del self._waiting[fd]
        self._loop.unwatch(fd)
        self._loop.cancel(entry.timer)  # nothing if this is its timer's call

    def _start_due(self) -> None:
        now = trio.current_time()
        stalled = now - self._last_done >= PATIENCE
        while self._due and (self._silent_started < self._silent_at_once or (stalled and self._due[0][1] <= now)):
            entry, _ = self._due.popleft()
            self._silent_started += 1
            self._start(entry.conn, entry.admitted, False)
        if self._due and self._patience_timer is None:
            # The first in line starts regardless once its patience runs out. If that moves later
            # meanwhile (the line moved on, a dial finished), the call comes early and sets the next.
            runs_out = max(self._due[0][1], self._last_done + PATIENCE)
            self._patience_timer = self._loop.call_at(runs_out, self._patience_ran_out)

    def _patience_ran_out(self) -> None:
        self._patience_timer = None
        self._start_due()

    def done_silent(self) -> None:
        """A task started for a silent connection has dialed, or failed: the next may start."""
        self._silent_started -= 1
        self._last_done = trio.current_time()
        if not self.closed:
            self._start_due()

    def close(self) -> None:
        """Stop waiting: every connection still here goes to ``abandon``."""
        if self.closed:
            return
        self._loop.close()  # wakes run(), if it waits
        left = [*self._waiting.values(), *(entry for entry, _ in self._due)]
        self._waiting, self._due = {}, collections.deque()
        for entry in left:
            self._abandon(entry.conn, entry.admitted)
