"""Copies bytes both ways between client and upstream until both directions end.

Each direction is a Flow from the fast path (splice through a pipe, or the
pure twin's bounded buffer) driven by its own task: try the step, and wait
only for the readiness it reports. A FIN is forwarded as shutdown(SHUT_WR)
while the other direction keeps going; a reset on either side resets both.
"""

import errno
import os
import socket
from dataclasses import dataclass

import trio

from relay import fastpath
from relay._fastpath_common import AGAIN, EOF, WANT_READ, WANT_WRITE, FlowError
from relay.net.sockets import reset

# Bytes one step may move before yielding, so one busy connection cannot starve the others.
STEP_BUDGET = 1 << 20
# The idle deadline is pushed back at most this often (seconds): cheaper than on every step.
IDLE_GRANULARITY = 1.0

CLIENT, UPSTREAM = 0, 1
SIDE_NAMES = ("client", "upstream")


async def _write_first(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``; an error is raised by the very call that got it, before any yield.

    A socket reports a reset to one call only, and later reads return 0: the
    pump must learn of the reset before the other direction can read that 0
    as a FIN. (Trio's sock.send yields before raising; Flow.step raises at once.)
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(sock.fileno(), view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


@dataclass
class PumpResult:
    sent_up: int  # client -> upstream
    sent_down: int  # upstream -> client
    # "closed", "client-reset", "upstream-reset", "idle-timeout", "half-closed-timeout", "cancelled",
    # or "relay-<errno>" when the relay itself ran out of something (e.g. relay-emfile)
    ended: str


class _Pump:
    __slots__ = ("sockets", "impl", "idle_timeout", "half_closed_timeout", "half_closed", "pipe_size", "moved",
                 "ended", "idle_scope", "last_bump", "nursery")

    def __init__(self, sockets, impl, idle_timeout, half_closed_timeout, pipe_size):
        self.sockets = sockets
        self.impl = impl
        self.idle_timeout = idle_timeout
        self.half_closed_timeout = half_closed_timeout
        self.half_closed = False
        self.pipe_size = pipe_size
        self.moved = [0, 0]  # indexed by the side that receives
        self.ended = None
        self.idle_scope = trio.CancelScope()
        self.last_bump = float("-inf")
        self.nursery = None

    def touch(self):
        now = trio.current_time()
        if now - self.last_bump >= IDLE_GRANULARITY:
            self.last_bump = now
            self.idle_scope.deadline = now + self.idle_timeout

    def one_direction_done(self):
        """From now on the silence allowed is the (shorter) half-closed timeout."""
        if not self.half_closed:
            self.half_closed = True
            self.idle_timeout = min(self.idle_timeout, self.half_closed_timeout)
            self.last_bump = float("-inf")
            self.touch()

    def fail_local(self, exc: OSError):
        if self.ended is None:
            self.ended = "relay-" + errno.errorcode.get(exc.errno, "error").lower()
        self.nursery.cancel_scope.cancel()

    def fail(self, side: int):
        if self.ended is None:
            self.ended = f"{SIDE_NAMES[side]}-reset"
        self.nursery.cancel_scope.cancel()

    async def one_way(self, src_side: int, first: bytes):
        dst_side = 1 - src_side
        src, dst = self.sockets[src_side], self.sockets[dst_side]
        flow = self.impl.Flow(self.pipe_size)
        try:
            if first:
                try:
                    await _write_first(dst, first)
                except OSError:
                    self.fail(dst_side)
                    return
                self.moved[dst_side] += len(first)
            src_fd, dst_fd = src.fileno(), dst.fileno()
            status = WANT_READ
            while True:
                if status == WANT_READ:
                    await trio.lowlevel.wait_readable(src)
                elif status == WANT_WRITE:
                    await trio.lowlevel.wait_writable(dst)
                elif status == AGAIN:
                    await trio.lowlevel.checkpoint()
                try:
                    status, moved = flow.step(src_fd, dst_fd, STEP_BUDGET)
                except FlowError as exc:
                    self.moved[dst_side] += exc.moved  # written before the error, as a returned step counts
                    self.fail(src_side if exc.reading else dst_side)
                    return
                except OSError as exc:  # no pipe or buffer: out of fds or memory
                    self.fail_local(exc)
                    return
                if moved:
                    self.moved[dst_side] += moved
                    self.touch()
                if status == EOF:
                    break
            if self.ended is not None:
                # The other direction already failed, maybe taking the reset this EOF stands for.
                return
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                self.fail(dst_side)
            else:
                self.one_direction_done()
        finally:
            flow.close()


async def pump(
    client: trio.socket.SocketType,
    upstream: trio.socket.SocketType,
    *,
    to_upstream_first: bytes = b"",
    to_client_first: bytes = b"",
    idle_timeout: float = 600.0,
    half_closed_timeout: float = 60.0,
    pipe_size: int = 0,
    impl=None,
) -> PumpResult:
    """Relay until both directions are done, then close both sockets (reset if it ended badly).

    ``to_*_first`` are bytes already read from the other side (handshake
    leftovers) that must go out before anything else.
    """
    state = _Pump((client, upstream), impl or fastpath.impl, idle_timeout, half_closed_timeout, pipe_size)
    state.touch()
    ended = "cancelled"  # stays so only if a cancellation from outside escapes
    try:
        with state.idle_scope:
            async with trio.open_nursery() as nursery:
                state.nursery = nursery
                nursery.start_soon(state.one_way, CLIENT, to_upstream_first)
                # The other direction runs in this task: one task fewer per connection.
                await state.one_way(UPSTREAM, to_client_first)
        if state.ended is None and state.idle_scope.cancelled_caught:
            state.ended = "half-closed-timeout" if state.half_closed else "idle-timeout"
        ended = state.ended or "closed"
    finally:
        if ended == "closed":
            client.close()
            upstream.close()
        else:
            reset(client)
            reset(upstream)
    return PumpResult(state.moved[UPSTREAM], state.moved[CLIENT], ended)
