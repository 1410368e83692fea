"""Whether Trio has anything to do, asked without a pass through its scheduler.

The pump stays in a busy transfer's event loop only while Trio has nothing
else to do (see relay.net.pump). Trio exposes the run queue and the next
deadline through ``current_statistics()``, but that counts every registered
fd on each call, and it does not expose its epoll fd at all. So this reads
the three from Trio's runner directly: one place that knows Trio's internals.
If a Trio release moves them, ``SchedulerPeek.current()`` returns None and the
pump simply always yields, as it would without this.
"""

import trio


class SchedulerPeek:
    """``fd`` is readable whenever some task's I/O is ready; ``idle()`` says whether no task is
    runnable; ``next_deadline()`` is the earliest cancel-scope deadline (Trio's clock)."""

    def __init__(self, runner):
        self._runner = runner
        self.fd = runner.io_manager._epoll.fileno()
        self.next_deadline = runner.deadlines.next_deadline

    @classmethod
    def current(cls) -> "SchedulerPeek | None":
        """For the running Trio loop; None if this Trio does not have what it needs."""
        try:
            peek = cls(trio._core._run.GLOBAL_RUN_CONTEXT.runner)
            peek.idle()
            peek.next_deadline()
        except (AttributeError, TypeError):
            return None
        return peek

    def idle(self) -> bool:
        """No task in the run queue. Tasks that Trio already took from it for the pass it is
        running (woken together with the caller) are not seen: they wait for the caller's turn."""
        return not self._runner.runq
