"""Relays every established connection with one engine and one task.

After its handshake a connection is handed to Pump.add() and its handler task
ends: an idle connection costs a row in the engine's table (relay._fastpath
Engine, or its pure twin), not a task and its frames. The engine moves bytes
both ways, forwards a FIN as shutdown(SHUT_WR) while the other direction goes
on, resets both sides when either resets, and enforces the idle timeouts; this
task wakes it when its epoll fd is readable or the next timeout is due, and
reports each connection that ended to ``on_finished``.
"""

import trio

from relay import fastpath
from relay.logs import log

# Bytes one run of the engine may move before yielding, so the accept loop and handshakes keep their turn.
RUN_BUDGET = 1 << 22


class Pump:
    """``on_finished(token, ended, sent_up, sent_down)`` is called once per added connection.

    ``ended`` is "closed", "client-reset", "upstream-reset", "idle-timeout",
    "half-closed-timeout", "cancelled", or "relay-<errno>" when the relay
    itself ran out of something (e.g. relay-emfile).
    """

    def __init__(self, on_finished, impl=None):
        self.engine = (impl or fastpath.impl).Engine()
        self.on_finished = on_finished
        self.waiting: trio.CancelScope | None = None  # the task's wait, to wake it for an earlier expiry

    def __len__(self) -> int:
        return len(self.engine)

    def add(self, client, upstream, token, *, idle_timeout: float, half_closed_timeout: float, pipe_size: int = 0,
            to_upstream_first: bytes = b"", to_client_first: bytes = b"") -> None:
        """Relay until both directions are done; the pump then owns (and closes) both sockets.

        ``to_*_first`` are bytes already read from the other side (handshake
        leftovers) that go out before anything else and count in the totals.
        """
        now = trio.current_time()
        self.engine.add(client.fileno(), upstream.fileno(), token, now, idle_timeout, half_closed_timeout, pipe_size,
                        to_upstream_first, to_client_first)
        client.detach()
        upstream.detach()
        if self.waiting is not None:
            self.waiting.deadline = self.engine.next_deadline  # perhaps earlier, with this connection

    async def run(self) -> None:
        """Drive the engine until cancelled, then reset every connection left (ended "cancelled")."""
        try:
            while True:
                with trio.move_on_at(self.engine.next_deadline) as self.waiting:
                    if self.engine.backlogged:
                        await trio.lowlevel.checkpoint()
                    else:
                        try:
                            await trio.lowlevel.wait_readable(self.engine.fileno())
                        except trio.ClosedResourceError:
                            return  # close() from another task: every connection is gone
                self.waiting = None
                now = trio.current_time()
                self.report(self.engine.run(now, RUN_BUDGET))
                if now >= self.engine.next_deadline:
                    self.report(self.engine.expire(now))
        finally:
            self.close()

    def close(self) -> None:
        """Reset every connection left (they end "cancelled") and end run(); later calls do nothing."""
        if self.engine.fileno() >= 0:
            trio.lowlevel.notify_closing(self.engine.fileno())
        self.report(self.engine.close())

    def report(self, finished) -> None:
        for token, ended, sent_up, sent_down in finished:
            try:
                self.on_finished(token, ended, sent_up, sent_down)
            except Exception:  # a bug must cost one connection's bookkeeping, not every connection
                log.exception("internal error after relaying a connection")
