"""The pump under generated interleavings of data, FINs and resets, on both fast-path twins.

A scenario is a list of actions on the two application ends of a pumped
connection (``client`` <-> relay <-> ``server``, real loopback TCP): send
random bytes (up to 256 KiB, past the socket buffers, which a scenario may
shrink), shut down writing (FIN), reset (SO_LINGER 0 + close), read what has
arrived, or let the pump run for a moment. Sends go out in the background in
order, so an action never blocks on backpressure. After the actions every end
still open sends FIN and reads until EOF or a reset, and the pump must return.

What the pump guarantees, observed from the sockets and how the pump reports the end only:

- Order and exactness: each end receives a prefix of what the other end sent
  (after the ``to_*_first`` bytes), in order, nothing duplicated or invented.
- FIN: an end sees EOF (without seeing a reset) only once it received every
  byte the other end sent before its FIN.
- Without resets: the pump ends "closed", both ends get everything then EOF,
  and the counts equal the bytes sent.
- A reset of one end ends the pump as "<that end>-reset" once the pump notices
  it, which is at its next read from or write to that end (so an end that sent
  FIN and then reset is noticed when the other end next sends or shuts down);
  the pump then resets the other end, which sees ECONNRESET or EPIPE on a
  later recv, send or shutdown, or pending in SO_ERROR. The one exception is an
  end whose TCP connection had already closed both ways (it sent FIN and read
  the EOF): a reset has nothing left to reset there. If both FINs had been
  relayed before the reset was noticed, the pump ends "closed" instead.
- Held FINs (--confirm-eof with a live proxy) change none of this: the FIN
  only comes later.
- Counts: in each direction, what the receiver got <= what the pump reports as
  written <= what the sender sent (plus the early bytes).
"""

import errno
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass, field

import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.pumping import pump
from tests.sockpairs import tcp_pair

SIDES = ("client", "server")
RESULT_NAMES = {"client": "client", "server": "upstream"}
# What a reset looks like from an application socket (ENOTCONN: shutdown after a RST).
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})
SCENARIO_TIMEOUT = 20  # seconds; a scenario normally takes a few milliseconds
FIN = object()


# --- scenarios ---------------------------------------------------------------------------

sides = st.sampled_from(SIDES)
sizes = st.one_of(st.integers(1, 1024), st.integers(1025, 64 * 1024), st.integers(128 * 1024, 256 * 1024))
sends = st.tuples(st.just("send"), sides, sizes, st.integers(0, 2**32 - 1))
plain_actions = [
    # Three times as likely as the others: enough bytes in flight to fill the buffers.
    sends,
    sends,
    sends,
    st.tuples(st.just("fin"), sides),
    st.tuples(st.just("read"), sides),
    st.tuples(st.just("pause"), st.integers(0, 20), st.sampled_from([0.0, 0.0, 0.001, 0.003])),
]
resets = st.tuples(st.just("reset"), sides)


@dataclass(frozen=True)
class Scenario:
    actions: list
    first_up: bytes  # to_upstream_first
    first_down: bytes  # to_client_first
    small_buffers: bool
    pipe_size: int
    confirm_delay: float | None  # with --confirm-eof: how long the probe takes to find the proxy alive


scenarios = st.builds(
    Scenario,
    # Half the scenarios have no reset, so that long exchanges are common too.
    actions=st.booleans().flatmap(
        lambda with_resets: st.lists(st.one_of(*plain_actions, *([resets] if with_resets else [])), max_size=14)
    ),
    first_up=st.one_of(st.just(b""), st.binary(max_size=2048)),
    first_down=st.one_of(st.just(b""), st.binary(max_size=2048)),
    small_buffers=st.sampled_from([True, True, False]),
    pipe_size=st.sampled_from([0, 0, 4096]),
    confirm_delay=st.sampled_from([None, None, 0.0, 0.002]),
)


def alive_after(delay: float):
    async def probe() -> bool:
        await trio.sleep(delay)
        return True

    return probe


# --- the two application ends -----------------------------------------------------------


@dataclass(eq=False)
class End:
    name: str
    sock: socket.socket  # non-blocking
    expected_in: bytes = b""  # the early bytes; the other end's sends are added by expected()
    other: "End" = None
    sent: bytearray = field(default_factory=bytearray)  # bytes the kernel took, in order
    fin_at: int | None = None  # len(sent) when shutdown(SHUT_WR) succeeded
    fin_queued: bool = False
    reset_done: bool = False  # this end reset its connection
    reset_after_fin: bool = False
    received: bytearray = field(default_factory=bytearray)
    eof_at: int | None = None  # len(received) when recv returned b""
    read_dead: bool = False  # recv raised a reset
    saw_reset: bool = False  # ECONNRESET/EPIPE/ENOTCONN from any call, or left in SO_ERROR
    blocked: bool = False  # a send waited for room: backpressure reached this end
    outbox: deque = field(default_factory=deque)
    wake: trio.Event = field(default_factory=trio.Event)
    writer_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def expected(self) -> bytes:
        return self.expected_in + self.other.sent

    # Writing, in the background and in order: data, then maybe FIN.

    def queue(self, item) -> None:
        self.outbox.append(item)
        self.wake.set()

    async def writer(self) -> None:
        with self.writer_scope:
            while not self.reset_done:  # woken, but reset before it ran
                if not self.outbox:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    continue
                item = self.outbox[0]
                try:
                    if item is FIN:
                        self.sock.shutdown(socket.SHUT_WR)
                        self.fin_at = len(self.sent)
                        return
                    sent = self.sock.send(item[:65536])
                except BlockingIOError:
                    self.blocked = True
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    assert exc.errno in RESET_ERRNOS, exc
                    self.saw_reset = True  # the rest of the outbox is never sent
                    return
                self.sent += item[:sent]
                if sent == len(item):
                    self.outbox.popleft()
                else:
                    self.outbox[0] = item[sent:]

    # Reading: what has arrived, or everything up to EOF.

    def read_available(self) -> None:
        while not (self.reset_done or self.read_dead or self.eof_at is not None):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                assert exc.errno in RESET_ERRNOS, exc
                self.saw_reset = self.read_dead = True
                return
            if not data:
                self.eof_at = len(self.received)
                return
            start = len(self.received)
            # Each byte is the next one the other end sent: in order, once, never invented.
            assert data == self.expected()[start : start + len(data)], (self.name, start, len(data))
            self.received += data

    async def read_to_end(self) -> None:
        while True:
            self.read_available()
            if self.reset_done or self.read_dead or self.eof_at is not None:
                return
            await trio.lowlevel.wait_readable(self.sock)

    def reset(self) -> None:
        self.writer_scope.cancel()
        self.reset_after_fin = self.fin_at is not None
        self.reset_done = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def collect_pending_error(self) -> None:
        if not self.reset_done and self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in RESET_ERRNOS:
            self.saw_reset = True


def shrink_buffers(sock: socket.socket) -> None:
    """Fixed 32 KiB buffers (64 KiB once the kernel doubles them), no autotuning.

    Smaller windows stall loopback TCP on delayed ACKs: 4 KiB made one
    megabyte take seconds.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)


# --- running a scenario -------------------------------------------------------------------


async def run(impl, scenario: Scenario):
    app_client, relay_client = tcp_pair()
    relay_upstream, app_server = tcp_pair()
    all_socks = (app_client, relay_client, relay_upstream, app_server)
    if scenario.small_buffers:
        for sock in all_socks:
            shrink_buffers(sock)
    for sock in (app_client, app_server):
        sock.setblocking(False)
    client = End("client", app_client, expected_in=scenario.first_down)
    server = End("server", app_server, expected_in=scenario.first_up)
    client.other, server.other = server, client
    ends = {"client": client, "server": server}
    outcome = []

    async def run_pump():
        outcome.append(
            await pump(
                trio.socket.from_stdlib_socket(relay_client),
                trio.socket.from_stdlib_socket(relay_upstream),
                to_upstream_first=scenario.first_up,
                to_client_first=scenario.first_down,
                pipe_size=scenario.pipe_size,
                confirm_eof=None if scenario.confirm_delay is None else alive_after(scenario.confirm_delay),
                impl=impl,
            )
        )

    try:
        with trio.fail_after(SCENARIO_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_pump)
                for end in ends.values():
                    nursery.start_soon(end.writer)
                for action in scenario.actions:
                    kind = action[0]
                    if kind == "pause":
                        for _ in range(action[1]):
                            await trio.sleep(0)
                        await trio.sleep(action[2])
                        continue
                    end = ends[action[1]]
                    if end.reset_done:
                        continue  # a closed socket does nothing more
                    if kind == "send" and not end.fin_queued:
                        end.queue(random.Random(action[3]).randbytes(action[2]))
                    elif kind == "fin" and not end.fin_queued:
                        end.fin_queued = True
                        end.queue(FIN)
                    elif kind == "reset":
                        end.reset()
                    elif kind == "read":
                        end.read_available()
                    await trio.sleep(0)
                # The end: whoever is still open says FIN and reads all there is.
                for end in ends.values():
                    if not end.reset_done:
                        if not end.fin_queued:
                            end.fin_queued = True
                            end.queue(FIN)
                        nursery.start_soon(end.read_to_end)
        for end in ends.values():
            end.collect_pending_error()
    finally:
        for sock in all_socks:
            sock.close()
    [result] = outcome
    return result, client, server


def check(scenario: Scenario, result, client: End, server: End) -> None:
    ends = (client, server)
    reset_ends = [end for end in ends if end.reset_done]
    first = {"client": scenario.first_up, "server": scenario.first_down}  # early bytes *from* each end's side
    counts = {"client": result.sent_up, "server": result.sent_down}  # written by the pump, from that end's side

    for end in ends:
        other = end.other
        # Order and exactness, once more on the whole.
        assert end.received == end.expected()[: len(end.received)]
        # Counts: received <= written by the pump <= sent.
        assert len(other.received) <= counts[end.name] <= len(first[end.name]) + len(end.sent)
        # An EOF without a reset comes only after everything sent before the FIN.
        if end.eof_at is not None and not end.saw_reset:
            assert other.fin_at is not None, f"{end.name} saw EOF but {other.name} never sent FIN"
            assert end.eof_at == len(end.expected_in) + other.fin_at

    if not reset_ends:
        assert result.ended == "closed"
    allowed = {f"{RESULT_NAMES[end.name]}-reset" for end in reset_ends}
    if all(end.reset_after_fin for end in reset_ends):
        allowed.add("closed")
    assert result.ended in allowed

    if result.ended == "closed":
        for end in ends:
            # Everything each end sent was written by the pump...
            assert counts[end.name] == len(first[end.name]) + len(end.sent)
            assert end.fin_at == len(end.sent)
            if not end.reset_done:
                # ...and arrived, then EOF, and no reset.
                assert end.received == end.expected()
                assert end.eof_at == len(end.received)
                assert not end.saw_reset
    else:
        for end in ends:
            closed_both_ways = end.fin_at is not None and end.eof_at is not None and not end.saw_reset
            if not end.reset_done and not closed_both_ways:
                assert end.saw_reset, f"the pump ended {result.ended} but {end.name} saw no reset"


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
def test_pump_under_generated_interleavings(impl, scenario):
    result, client, server = trio.run(run, impl, scenario)
    event(f"ended {result.ended}")
    if client.blocked or server.blocked:
        event("backpressure")
    check(scenario, result, client, server)
