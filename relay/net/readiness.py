"""Many sockets waited on by one Trio task: one epoll, one heap of timers, calls back.

A Trio task waiting on one socket costs about 6 KiB (the task, its coroutine
frames, a cancel scope) and a scheduler pass per wakeup. Where thousands of
sockets each wait for one thing with a time limit (an upstream connection
being opened, a client that has not spoken yet), a ReadinessLoop waits for
all of them: a socket is an epoll registration and a heap entry, and one
task (``run``) makes the calls for what is ready or due. It knows file
descriptors, events, times and callbacks; what they are for is the
caller's (relay.net.dial, relay.net.waiting).
"""

import heapq
import itertools
import math
import select

import trio

from relay.logs import log

MAX_EVENTS = 256  # per epoll_wait; more wait for the next pass
STALE_MIN = 256  # cancelled timers tolerated in the heap before it is rebuilt


class Timer:
    """A call to be made by a ReadinessLoop at a given time; ``callback`` is None once it has been
    made or cancelled."""

    __slots__ = ("callback", "args")

    def __init__(self, callback, args):
        self.callback, self.args = callback, args


class ReadinessLoop:
    """Calls ``callback(*args)`` from ``run()`` for each watched fd that is ready and each timer that
    is due. A callback that raises is logged and costs only that call; whatever it was for, its fd
    and timer are the caller's to ``unwatch`` and ``cancel``."""

    def __init__(self):
        self._epoll = select.epoll()
        self._watched: dict[int, tuple] = {}  # fd -> (events, callback, args)
        self._timers: list = []  # heap of (when, order, timer); cancelled ones are skipped
        self._order = itertools.count()  # timers due at the same time go in the order they were set
        self._cancelled = 0  # cancelled timers still in the heap
        self._alarm: trio.CancelScope | None = None  # the deadline of run()'s wait, while it waits

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def watch(self, fd: int, events: int, callback, *args) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is ready for ``events`` (EPOLL* flags: level-triggered,
        or once with EPOLLONESHOT), until ``unwatch(fd)``; watching it again changes the events and the
        call. Raises OSError if the epoll cannot take it (ENOSPC at its watch limit, ENOMEM)."""
        watched = self._watched.get(fd)
        if watched is None:
            self._epoll.register(fd, events)
        elif events != watched[0] or events & select.EPOLLONESHOT:  # modify() also re-arms a one-shot
            self._epoll.modify(fd, events)
        self._watched[fd] = (events, callback, args)

    def unwatch(self, fd: int) -> None:
        """No more calls for ``fd``; nothing if it is not watched. Call it before closing the fd."""
        if self._watched.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def call_at(self, when: float, callback, *args) -> Timer:
        """Call ``callback(*args)`` once ``when`` (Trio's clock) has passed, unless cancelled first."""
        timer = Timer(callback, args)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        if self._alarm is not None and when < self._alarm.deadline:
            self._alarm.deadline = when
        return timer

    def cancel(self, timer: Timer) -> None:
        """Its call will not be made; nothing if it has been made. A cancelled timer stays in the heap
        until its time (a dial's, 10 s at the default handshake timeout), unless cancelled ones come
        to more than half of the heap: then it is rebuilt without them."""
        if timer.callback is None:
            return
        timer.callback, timer.args = None, ()  # what it was for can go now
        self._cancelled += 1
        if self._cancelled > STALE_MIN and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if entry[2].callback is not None]
            heapq.heapify(self._timers)
            self._cancelled = 0

    async def run(self) -> None:
        """Make the calls for what is ready, then for what is due, pass after pass, until close()."""
        while not self.closed:
            while self._timers and self._timers[0][2].callback is None:
                heapq.heappop(self._timers)  # cancelled: no wakeup for it
                self._cancelled -= 1
            with trio.CancelScope(deadline=self._timers[0][0] if self._timers else math.inf) as self._alarm:
                try:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                except trio.ClosedResourceError:
                    return
            self._alarm = None
            if self.closed:
                return
            # What each fd was watched for when it was found ready: a call of this pass may unwatch
            # another fd, close it, and watch a new socket that got the same number.
            ready = [(fd, self._watched.get(fd)) for fd, _ in self._epoll.poll(0, MAX_EVENTS)]
            for fd, watched in ready:
                if watched is not None and self._watched.get(fd) is watched:  # else unwatched or replaced
                    self._call(watched[1], watched[2])
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if timer.callback is None:
                    self._cancelled -= 1
                    continue
                callback, args = timer.callback, timer.args
                timer.callback, timer.args = None, ()  # made: cancelling it now does nothing
                self._call(callback, args)

    def close(self) -> None:
        """Stop: run() returns, and no more calls are made."""
        if self.closed:
            return
        trio.lowlevel.notify_closing(self._epoll.fileno())  # wakes run(), if it waits
        self._epoll.close()
        for _, _, timer in self._timers:
            timer.callback, timer.args = None, ()
        self._watched, self._timers, self._cancelled = {}, [], 0

    @staticmethod
    def _call(callback, args) -> None:
        try:
            callback(*args)
        except Exception:  # a bug must cost the one connection it was called for, not every other
            log.exception("internal error in %r", callback)
