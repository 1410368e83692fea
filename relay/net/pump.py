"""Relays every established connection with one engine and two tasks.

Once its tunnel is open (relay.net.dial.Dialer) a connection is handed to
Pump.add(): an idle connection costs a row in the engine's table
(relay.fastpath.Engine), not a task and its frames. The engine moves bytes
both ways, forwards a FIN as shutdown(SHUT_WR) while the other direction goes
on, resets both sides when either resets, and enforces the idle timeouts. One
task runs it whenever its epoll fd is readable, another when the next timeout
is due; both report each connection that ended to ``on_finished``.

A busy transfer wakes the engine thousands of times per GB, and a pass
through Trio's scheduler for each wakeup cost more than the wakeup's own work.
So after a run that moved a bulk of bytes, the task waits for the engine's
next event itself, for as long as events keep coming and Trio has nothing
else to do: no task runnable, no I/O ready (Trio's epoll fd is watched
alongside the engine's), no deadline due; at most BUSY_TURN at a time, which
is also as long as a task woken in the same pass as this one may wait.

A FIN from a proxy that dies looks like any other FIN: the kernel closes its
sockets cleanly. With ``confirm_eof`` a connection's upstream FIN is held
until a probe *started after it* shows the proxy still there; if not, the
client gets a reset rather than a clean end of a truncated transfer. Probes
are shared: one per proxy at a time, covering every FIN that came before it.
The engine only holds the FIN; what to do with it is decided here.
"""

import select
import time

import trio

from relay import ends, fastpath
from relay.logs import log
from relay.net.scheduler import SchedulerPeek
from relay.net.sockmap import MAX_BACKLOG, KernelCarrier
from relay.net.tls import TlsRelay

# Bytes one run of the engine may move before yielding, so the accept loop and handshakes keep their turn.
RUN_BUDGET = 1 << 22
# A run that moved this much was a bulk transfer's: its next event is likely near...
BULK_RUN = 1 << 16
# ...but one that moved this much is batched well by the time Trio's pass takes (uploads move MBs per run).
BATCHED_RUN = 1 << 20
BUSY_WAIT = 0.001  # how long to wait for that event before going back to Trio
# How long a stay may last. It also bounds what the peek cannot see: tasks that Trio woke in the
# same pass as this one, but had not run yet (they wait for the stay to end).
BUSY_TURN = 0.002


class Pump:
    """``on_finished(token, ended, sent_up, sent_down)`` is called once per added connection.

    ``ended`` is one of the words in relay.ends (UPSTREAM_DOWN: the proxy died,
    see confirm_eof), or ends.local_failure() when the relay itself ran out of
    something (e.g. relay-emfile). ``impl`` picks a fast-path twin (tests).
    """

    def __init__(self, on_finished, impl=None, engine: str = "splice", max_backlog: int = MAX_BACKLOG):
        self.engine = (impl or fastpath).Engine()
        self.on_finished = on_finished
        self.carrier: KernelCarrier | None = None  # --engine sockmap: carries what it can, the engine the rest
        self.sent_before: dict = {}  # token -> (up, down) the carrier sent before it left the connection here
        if engine == "sockmap":
            try:
                self.carrier = KernelCarrier(self.report, max_backlog)
            except OSError as exc:
                log.warning(
                    "--engine sockmap: the kernel refused it (%s); every connection is spliced", exc.strerror or exc
                )
        self.alarm: trio.CancelScope | None = None  # keep_time()'s sleep until the next expiry
        self.nursery: trio.Nursery | None = None  # the probes', while run() runs
        self.probes: dict = {}  # token -> its confirm_eof probe, for connections that hold upstream FINs
        self.unconfirmed: dict = {}  # probe -> handles of held FINs waiting for its next run
        self.tls: dict = {}  # token -> TlsRelay: connections to https:// proxies, relayed by a task each

    def __len__(self) -> int:
        return len(self.engine) + len(self.tls) + (len(self.carrier) if self.carrier else 0)

    def add(
        self,
        client,
        upstream,
        token,
        *,
        idle_timeout: float,
        half_closed_timeout: float,
        pipe_size: int = 0,
        to_upstream_first: bytes = b"",
        to_client_first: bytes = b"",
        confirm_eof=None,
    ) -> None:
        """Relay until both directions are done; the pump then owns (and closes) both sockets.

        ``to_*_first`` are bytes already read from the other side (handshake
        leftovers) that go out before anything else and count in the totals.
        ``confirm_eof`` is an async callable, shared by the connections through
        one proxy, answering whether that proxy is still alive.
        """
        if getattr(upstream, "session", None) is not None:  # TLS to the proxy: a task (relay.net.tls)
            self.add_tls(client, upstream, token, idle_timeout, half_closed_timeout, to_upstream_first,
                         to_client_first, confirm_eof)  # fmt: skip
            return
        if self.carrier is not None and confirm_eof is None:  # held FINs are the engine's
            declined = self.carrier.add(client, upstream, token, idle_timeout, half_closed_timeout,
                                        to_upstream_first, to_client_first)  # fmt: skip
            if declined is None:
                return
            to_upstream_first, to_client_first = declined.to_upstream_first, declined.to_client_first
            if declined.sent_up or declined.sent_down:
                self.sent_before[token] = (declined.sent_up, declined.sent_down)
        now = trio.current_time()
        self.engine.add(
            client.fileno(),
            upstream.fileno(),
            token,
            now,
            idle_timeout,
            half_closed_timeout,
            pipe_size,
            to_upstream_first,
            to_client_first,
            confirm_eof is not None,
        )
        client.detach()
        upstream.detach()
        if confirm_eof is not None:
            self.probes[token] = confirm_eof
        self.rearm()

    def add_tls(self, client, upstream, token, idle_timeout, half_closed_timeout, to_upstream_first, to_client_first,
                confirm_eof) -> None:  # fmt: skip
        if self.nursery is None:
            raise RuntimeError("the pump is not running")
        relay = TlsRelay(
            client,
            upstream,
            token,
            self.tls_finished,
            idle_timeout=idle_timeout,
            half_closed_timeout=half_closed_timeout,
            to_upstream_first=to_upstream_first,
            to_client_first=to_client_first,
            confirm_eof=confirm_eof,
        )
        self.tls[token] = relay
        self.nursery.start_soon(relay.run)

    def tls_finished(self, token, ended, sent_up, sent_down) -> None:
        self.tls.pop(token, None)
        self.report([(token, ended, sent_up, sent_down)])

    def counts(self) -> list:
        """(token, sent_up, sent_down) of each connection relaying now, so far (see Engine.counts)."""
        counts = self.engine.counts()
        if self.tls:
            counts = [*counts, *((token, relay.up, relay.down) for token, relay in self.tls.items())]
        if self.carrier:
            counts = [*counts, *self.carrier.counts()]
        return counts

    def rearm(self) -> None:
        """Wake keep_time() earlier if a new or half-closed connection may time out earlier."""
        if self.alarm is not None and self.engine.next_deadline < self.alarm.deadline:
            self.alarm.deadline = self.engine.next_deadline

    async def run(self) -> None:
        """Drive the engine until cancelled, then reset every connection left (ended ends.CANCELLED)."""
        try:
            async with trio.open_nursery() as self.nursery:
                self.nursery.start_soon(self.keep_time)
                if self.carrier is not None:
                    self.nursery.start_soon(self.carrier.run)
                await self.drive()
                self.nursery.cancel_scope.cancel()  # the timer, and probes whose connections are gone
        finally:
            self.nursery = None
            self.close()

    async def drive(self) -> None:
        """Run the engine whenever its epoll fd is readable.

        No cancel scope per wait (timeouts are keep_time's): this loop runs once
        per wakeup of a busy transfer, and a scope per turn cost a third of it.
        """
        peek = SchedulerPeek.current()
        with select.epoll() as waiter:
            if peek is not None:
                waiter.register(self.engine.fileno(), select.EPOLLIN)
            while True:
                if self.engine.backlogged:
                    await trio.lowlevel.checkpoint()
                else:
                    try:
                        await trio.lowlevel.wait_readable(self.engine.fileno())
                    except trio.ClosedResourceError:
                        return  # close() from another task: every connection is gone
                if self.engine.fileno() < 0:
                    return  # closed from another task while this one waited its turn
                self.run_engine()
                if peek is not None and BULK_RUN <= self.engine.moved < BATCHED_RUN:
                    self.stay_while_busy(waiter, peek)

    def run_engine(self) -> None:
        self.report(self.engine.run(trio.current_time(), RUN_BUDGET))
        self.rearm()
        self.hold_new_fins()

    def stay_while_busy(self, waiter, peek: SchedulerPeek) -> None:
        """Run the engine on its next events without yielding, while they come within BUSY_WAIT
        and Trio has nothing to do, for at most BUSY_TURN, and until a run moves BATCHED_RUN.

        Trio's epoll fd is watched only meanwhile: while an epoll fd is itself watched, the
        kernel checks every fd added to it for loops under a global lock, and Trio adds one
        per connection it waits on.
        """
        turn_ends = time.monotonic() + BUSY_TURN  # real time: a test's mock clock may stand still
        waiter.register(peek.fd, select.EPOLLIN)
        try:
            while not self.engine.backlogged and peek.idle() and self.engine.moved < BATCHED_RUN:
                wait = min(turn_ends - time.monotonic(), peek.next_deadline() - trio.current_time())
                if wait <= 0:
                    return
                events = waiter.poll(min(wait, BUSY_WAIT))
                if len(events) != 1 or events[0][0] != self.engine.fileno():
                    return  # nothing came, or Trio's I/O did
                self.run_engine()
        finally:
            waiter.unregister(peek.fd)

    async def keep_time(self) -> None:
        """End the connections whose timeout came, when the earliest can come."""
        while True:
            with trio.CancelScope(deadline=self.engine.next_deadline) as self.alarm:
                await trio.sleep_forever()
            self.alarm = None
            now = trio.current_time()
            if now >= self.engine.next_deadline:
                self.report(self.engine.expire(now))

    def hold_new_fins(self) -> None:
        for handle, token in self.engine.take_held():
            self.hold(handle, self.probes[token])  # take_held() leaves out what ended: the probe is there

    def hold(self, handle, probe) -> None:
        """Queue a held FIN for the next run of its probe, starting that probe if none is running."""
        waiting = self.unconfirmed.get(probe)
        if waiting is not None:
            waiting.append(handle)
            return
        self.unconfirmed[probe] = [handle]
        self.nursery.start_soon(self.confirm, probe)

    async def confirm(self, probe) -> None:
        """Probe, release the FINs that came before the probe began, and again while more came meanwhile."""
        try:
            while handles := self.unconfirmed[probe]:
                self.unconfirmed[probe] = []  # FINs from now on wait for a later probe
                try:
                    genuine = await probe()
                except Exception:  # a bug must not take every connection down: let the FINs through
                    log.exception("internal error while probing an upstream")
                    genuine = True
                now = trio.current_time()
                for handle in handles:
                    if genuine:
                        self.report(self.engine.release(handle, now))
                    else:
                        self.report(self.engine.abort(handle, ends.UPSTREAM_DOWN))
                self.rearm()
        finally:
            del self.unconfirmed[probe]

    def reclaim(self, ended: str) -> bool:
        """End the idlest connection whose client never sent a byte (see Engine.reclaim): whether one was."""
        finished = self.engine.reclaim(ended)
        self.report(finished)
        return bool(finished) or (self.carrier is not None and self.carrier.reclaim(ended))

    def close(self) -> None:
        """Reset every connection left (they end ends.CANCELLED) and end run(); later calls do nothing."""
        if self.engine.fileno() >= 0:
            trio.lowlevel.notify_closing(self.engine.fileno())
        for relay in list(self.tls.values()):
            relay.finish(ends.CANCELLED)
        if self.carrier is not None:
            self.carrier.close()
            self.carrier = None
        self.report(self.engine.close())

    def report(self, finished) -> None:
        for token, ended, sent_up, sent_down in finished:
            if self.probes:
                self.probes.pop(token, None)
            if self.sent_before and (before := self.sent_before.pop(token, None)):
                sent_up, sent_down = sent_up + before[0], sent_down + before[1]
            try:
                self.on_finished(token, ended, sent_up, sent_down)
            except Exception:  # a bug must cost one connection's bookkeeping, not every connection
                log.exception("internal error after relaying a connection")
