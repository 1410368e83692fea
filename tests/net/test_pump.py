"""The pump (one engine, one task) over real loopback TCP connections, on both fast-path implementations."""

import contextlib
import errno
import hashlib
import os
import select
import socket
import threading
import time

import pytest
import trio

from relay.net.pump import BATCHED_RUN, BULK_RUN, Pump
from relay.net.scheduler import SchedulerPeek
from tests.pumping import pump
from tests.sockpairs import hard_close, tcp_pair


def trio_pair():
    a, b = tcp_pair()
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


@pytest.fixture
async def wires():
    """app_client <-> relay_client ==pump== relay_upstream <-> app_server."""
    app_client, relay_client = trio_pair()
    relay_upstream, app_server = trio_pair()
    yield app_client, relay_client, relay_upstream, app_server
    for s in (app_client, relay_client, relay_upstream, app_server):
        s.close()


@pytest.fixture(params=["splice", "sockmap"])
def engine(request):
    """The pump's engines; with sockmap the kernel carries the connection (relay.net.sockmap)."""
    return request.param


async def send_then_eof(sock, data):
    view = memoryview(data)
    while view:
        view = view[await sock.send(view[:65536]) :]
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock, out: list):
    digest, count = hashlib.sha256(), 0
    while data := await sock.recv(65536):
        digest.update(data)
        count += len(data)
    out.extend([count, digest.hexdigest()])


async def test_both_directions_at_once_with_early_bytes(impl, engine, wires):
    app_client, relay_client, relay_upstream, app_server = wires
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    early_up, early_down = b"sniffed-first", b"banner-from-handshake"
    got_at_server, got_at_client = [], []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, app_client, up)
            nursery.start_soon(send_then_eof, app_server, down)
            nursery.start_soon(read_to_eof, app_server, got_at_server)
            nursery.start_soon(read_to_eof, app_client, got_at_client)
            result = await pump(
                relay_client,
                relay_upstream,
                to_upstream_first=early_up,
                to_client_first=early_down,
                impl=impl,
                engine=engine,
            )
    assert result.ended == "closed"
    assert result.sent_up == len(early_up) + len(up) and result.sent_down == len(early_down) + len(down)
    assert got_at_server == [len(early_up) + len(up), hashlib.sha256(early_up + up).hexdigest()]
    assert got_at_client == [len(early_down) + len(down), hashlib.sha256(early_down + down).hexdigest()]


@pytest.mark.parametrize("first_to_finish", ["client", "server"])
async def test_half_close_keeps_the_other_direction(impl, engine, wires, first_to_finish):
    app_client, relay_client, relay_upstream, app_server = wires
    quitter, stayer = (app_client, app_server) if first_to_finish == "client" else (app_server, app_client)
    late = os.urandom(1 << 20)

    async def conversation():
        await send_then_eof(quitter, b"request, then FIN")
        got = []
        await read_to_eof(stayer, got)  # the FIN arrived as EOF on the other side...
        assert got[0] == len(b"request, then FIN")
        await trio.sleep(0.2)  # ...and the quitter's side is still open the other way
        await send_then_eof(stayer, late)
        back = []
        await read_to_eof(quitter, back)
        assert back == [len(late), hashlib.sha256(late).hexdigest()]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conversation)
            result = await pump(relay_client, relay_upstream, impl=impl, engine=engine)
    assert result.ended == "closed"


@pytest.mark.parametrize("who", ["client", "server"])
async def test_reset_is_propagated(impl, engine, wires, who):
    app_client, relay_client, relay_upstream, app_server = wires
    culprit, victim = (app_client, app_server) if who == "client" else (app_server, app_client)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def crash():
                await culprit.send(b"some bytes before the crash")
                await trio.sleep(0.1)
                hard_close(culprit)

            nursery.start_soon(crash)
            result = await pump(relay_client, relay_upstream, impl=impl, engine=engine)
    assert result.ended == ("client-reset" if who == "client" else "upstream-reset")
    with pytest.raises(ConnectionResetError):
        with trio.fail_after(5):
            while await victim.recv(65536):
                pass


async def test_idle_timeout_resets_both(impl, engine, wires, autojump_clock):
    app_client, relay_client, relay_upstream, app_server = wires
    result = await pump(relay_client, relay_upstream, idle_timeout=30, impl=impl, engine=engine)
    assert result.ended == "idle-timeout"
    for peer in (app_client, app_server):
        with pytest.raises(OSError) as caught:
            with trio.fail_after(5):
                await peer.recv(10)
        assert caught.value.errno == errno.ECONNRESET


async def test_activity_postpones_idle_timeout(impl, engine, wires):
    app_client, relay_client, relay_upstream, app_server = wires

    async def chatter():
        for _ in range(8):
            await app_client.send(b"ping")
            assert await app_server.recv(10) == b"ping"
            await trio.sleep(0.4)
        app_client.shutdown(socket.SHUT_WR)
        app_server.shutdown(socket.SHUT_WR)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chatter)
            result = await pump(relay_client, relay_upstream, idle_timeout=1.5, impl=impl, engine=engine)
    # 8 x 0.4 s is longer than the idle timeout; only the traffic kept it alive.
    assert result.ended == "closed" and result.sent_up == 32


async def test_half_closed_timeout_wakes_the_pump_early(impl, engine, wires):
    """The half-closed deadline comes before the idle one the pump was waiting for."""
    app_client, relay_client, relay_upstream, app_server = wires
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def finish_up():  # once relayed: a socket that has its FIN is never the kernel's
                await trio.sleep(0.05)
                app_client.shutdown(socket.SHUT_WR)

            nursery.start_soon(finish_up)
            result = await pump(
                relay_client, relay_upstream, idle_timeout=600, half_closed_timeout=0.5, impl=impl, engine=engine
            )
    assert result.ended == "half-closed-timeout"


async def test_cancelling_the_pump_resets_what_is_left(impl, engine, wires):
    """Shutdown: the pump's task is cancelled; every connection is reported "cancelled" and reset."""
    app_client, relay_client, relay_upstream, app_server = wires
    ended = []
    async with trio.open_nursery() as nursery:
        relay = Pump(lambda *result: ended.append(result), impl=impl, engine=engine)
        nursery.start_soon(relay.run)
        relay.add(relay_client, relay_upstream, "held", idle_timeout=600, half_closed_timeout=60)
        await app_client.send(b"hello")
        assert await app_server.recv(10) == b"hello"
        nursery.cancel_scope.cancel()
    assert ended == [("held", "cancelled", 5, 0)] and len(relay) == 0
    for peer in (app_client, app_server):
        with pytest.raises(OSError) as caught:
            with trio.fail_after(5):
                await peer.recv(10)
        assert caught.value.errno == errno.ECONNRESET


class Probe:
    """A stand-in for a proxy liveness probe: answers ``alive`` after ``delay``; records when it began."""

    def __init__(self, alive=True, delay=0.05):
        self.alive, self.delay, self.started = alive, delay, []

    async def __call__(self):
        self.started.append(trio.current_time())
        await trio.sleep(self.delay)
        if isinstance(self.alive, Exception):
            raise self.alive
        return self.alive


async def relay_with_probe(impl, probe, count, on_held):
    """``count`` connections through one pump, each confirming upstream FINs with ``probe``.

    ``on_held(ends, when)`` runs once all are relayed; returns what ended, in order.
    """
    ended = []
    ends = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = Pump(lambda *result: ended.append(result), impl=impl)
            nursery.start_soon(relay.run)
            for i in range(count):
                app_client, relay_client = trio_pair()
                relay_upstream, app_server = trio_pair()
                relay.add(relay_client, relay_upstream, i, idle_timeout=600, half_closed_timeout=60, confirm_eof=probe)
                ends.append((app_client, app_server))
            await on_held(ends)
            while len(ended) < count:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for app_client, app_server in ends:
        app_client.close()
        app_server.close()
    return ended


async def test_a_confirmed_upstream_fin_reaches_the_client_after_the_probe(impl):
    probe = Probe(alive=True)

    async def on_held(ends):
        [(app_client, app_server)] = ends
        await send_then_eof(app_server, b"last words")
        fin_sent = trio.current_time()
        assert await app_client.recv(100) == b"last words"
        assert await app_client.recv(100) == b""
        assert probe.started and probe.started[0] >= fin_sent  # begun after the FIN, so it speaks for it
        assert trio.current_time() - fin_sent >= probe.delay
        await send_then_eof(app_client, b"bye")

    assert await relay_with_probe(impl, probe, 1, on_held) == [(0, "closed", 3, 10)]


async def test_an_upstream_fin_from_a_dead_proxy_becomes_a_reset(impl):
    async def on_held(ends):
        [(app_client, app_server)] = ends
        await send_then_eof(app_server, b"truncated")
        assert await app_client.recv(100) == b"truncated"  # what came before the FIN is delivered
        with pytest.raises(OSError) as caught:
            await app_client.recv(100)
        assert caught.value.errno == errno.ECONNRESET

    assert await relay_with_probe(impl, Probe(alive=False), 1, on_held) == [(0, "upstream-down", 0, 9)]


async def test_one_probe_covers_every_fin_before_it_and_later_fins_wait_for_the_next(impl):
    probe = Probe(alive=True, delay=0.2)

    async def on_held(ends):
        for _, app_server in ends[:5]:
            app_server.shutdown(socket.SHUT_WR)
        while not probe.started:
            await trio.sleep(0.01)
        for _, app_server in ends[5:]:  # while the first probe runs
            app_server.shutdown(socket.SHUT_WR)
        for app_client, _ in ends:
            assert await app_client.recv(10) == b""
            app_client.shutdown(socket.SHUT_WR)

    ended = await relay_with_probe(impl, probe, 8, on_held)
    assert sorted(ended) == [(i, "closed", 0, 0) for i in range(8)]
    assert len(probe.started) == 2


async def test_a_failing_probe_lets_the_fin_through(impl, caplog):
    async def on_held(ends):
        [(app_client, app_server)] = ends
        app_server.shutdown(socket.SHUT_WR)
        assert await app_client.recv(10) == b""
        app_client.shutdown(socket.SHUT_WR)

    probe = Probe(alive=RuntimeError("a bug in the probe"))
    assert await relay_with_probe(impl, probe, 1, on_held) == [(0, "closed", 0, 0)]
    assert "internal error while probing" in caplog.text


async def test_a_connection_reset_while_its_fin_is_held_ends_once(impl):
    async def on_held(ends):
        [(app_client, app_server)] = ends
        app_server.shutdown(socket.SHUT_WR)
        await trio.sleep(0.1)  # the FIN is held, the probe runs
        hard_close(app_client)
        await trio.sleep(0.6)  # the probe ends and releases a connection that is gone

    ended = await relay_with_probe(impl, Probe(alive=False, delay=0.5), 1, on_held)
    assert ended == [(0, "client-reset", 0, 0)]


async def test_a_fin_held_in_the_run_that_also_resets_the_connection(impl):
    """The FIN is held and the client's reset read in one run: the pump goes on serving the others."""
    probe = Probe(alive=True)

    async def on_held(ends):
        (app_client, app_server), (other_client, other_server) = ends
        await trio.sleep(0.05)
        app_server.shutdown(socket.SHUT_WR)
        hard_close(app_client)  # no checkpoint between the two: one run sees both
        await other_client.send(b"still served")
        assert await other_server.recv(100) == b"still served"
        await send_then_eof(other_client, b"")
        await send_then_eof(other_server, b"")

    ended = await relay_with_probe(impl, probe, 2, on_held)
    assert sorted(ended) == [(0, "client-reset", 0, 0), (1, "closed", 12, 0)]


def paced_stream(app_client, app_server, stop: threading.Event, seconds: float = 30.0):
    """Threads that send 128 KiB every millisecond into app_client (at most ``seconds``) and drain
    app_server: a steady stream of small runs, as a download makes them, slow enough for either
    engine on a loaded CI machine."""

    def send():
        chunk = bytes(1 << 17)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            while not stop.is_set() and time.monotonic() < deadline:
                app_client.sendall(chunk)
                time.sleep(0.001)
        app_client.close()

    def drain():
        buffer = bytearray(1 << 20)
        with contextlib.suppress(OSError):
            while app_server.recv_into(buffer):
                pass

    threads = [threading.Thread(target=send), threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture
async def streaming_pump(impl):
    """A Pump whose one connection carries a paced stream, and its run_engine() calls."""
    pump = Pump(lambda *ended: None, impl=impl)
    app_client, relay_client = tcp_pair()
    relay_upstream, app_server = tcp_pair()
    relay_client.setblocking(False)
    relay_upstream.setblocking(False)
    pump.add(relay_client, relay_upstream, "t", idle_timeout=60, half_closed_timeout=60)
    stop = threading.Event()
    threads = paced_stream(app_client, app_server, stop)
    runs = []
    pump.run_engine = lambda: (runs.append(1), Pump.run_engine(pump))
    yield pump, runs
    stop.set()
    pump.close()
    for thread in threads:
        thread.join(10)
    app_server.close()


def only_trio_can_end_the_stay(monkeypatch):
    """No end by a pause in the stream, the turn's length, a large run or the run budget."""
    monkeypatch.setattr("relay.net.pump.BUSY_WAIT", 5.0)
    monkeypatch.setattr("relay.net.pump.BUSY_TURN", 60.0)
    monkeypatch.setattr("relay.net.pump.BATCHED_RUN", 1 << 40)
    monkeypatch.setattr("relay.net.pump.RUN_BUDGET", 1 << 40)


def waiter_for(pump):
    waiter = select.epoll()
    waiter.register(pump.engine.fileno(), select.EPOLLIN)
    return waiter


async def test_a_busy_engine_keeps_the_task_while_trio_is_idle(streaming_pump, monkeypatch):
    pump, runs = streaming_pump
    only_trio_can_end_the_stay(monkeypatch)
    monkeypatch.setattr("relay.net.pump.BUSY_TURN", 0.5)
    peek = SchedulerPeek.current()
    with waiter_for(pump) as waiter:
        await trio.testing.wait_all_tasks_blocked()
        started = time.monotonic()
        pump.stay_while_busy(waiter, peek)
        with pytest.raises(FileNotFoundError):
            waiter.unregister(peek.fd)  # watched only during the stay
    assert len(runs) >= 2  # it ran the engine on its next events without going back to Trio
    assert time.monotonic() - started < 5  # and gave it back after BUSY_TURN (generous for slow CI)


@pytest.mark.parametrize("trio_has", ["a runnable task", "ready io"])
async def test_a_busy_engine_gives_way_when_trio_has_work(streaming_pump, trio_has, monkeypatch):
    pump, runs = streaming_pump
    only_trio_can_end_the_stay(monkeypatch)
    peek = SchedulerPeek.current()
    ready_a, ready_b = socket.socketpair()
    with waiter_for(pump) as waiter, ready_a, ready_b:
        async with trio.open_nursery() as nursery:
            if trio_has == "a runnable task":
                nursery.start_soon(trio.sleep, 0)
                pump.stay_while_busy(waiter, peek)
            else:
                ready_a.setblocking(False)
                nursery.start_soon(trio.lowlevel.wait_readable, ready_a)
                await trio.testing.wait_all_tasks_blocked()
                ready_b.send(b"x")
                pump.stay_while_busy(waiter, peek)
    assert runs == []


async def test_a_busy_engine_gives_way_when_a_deadline_comes(streaming_pump, monkeypatch):
    pump, runs = streaming_pump
    only_trio_can_end_the_stay(monkeypatch)
    peek = SchedulerPeek.current()
    with waiter_for(pump) as waiter:
        await trio.testing.wait_all_tasks_blocked()
        started = time.monotonic()
        with trio.move_on_after(0.05):
            pump.stay_while_busy(waiter, peek)
    assert runs  # it stayed until the deadline...
    assert time.monotonic() - started < 4  # ...not for the (patched) BUSY_WAIT after the stream's end


async def test_a_run_that_moved_a_batch_gives_the_task_back(streaming_pump, monkeypatch):
    """Runs that move a lot are batched well enough by Trio's pass: staying would only make them smaller."""
    pump, runs = streaming_pump
    only_trio_can_end_the_stay(monkeypatch)
    monkeypatch.setattr("relay.net.pump.BATCHED_RUN", 1)
    peek = SchedulerPeek.current()
    with waiter_for(pump) as waiter:
        await trio.testing.wait_all_tasks_blocked()
        pump.stay_while_busy(waiter, peek)
    assert runs == [1]


async def test_the_pump_stays_after_bulk_runs_only(impl, monkeypatch):
    """Through the real drive loop: a paced stream's runs lead to stays, each after a run of
    BULK_RUN to BATCHED_RUN; a small exchange leads to none."""
    moved_before_stays = []
    original = Pump.stay_while_busy

    def spy(self, waiter, peek):
        moved_before_stays.append(self.engine.moved)
        original(self, waiter, peek)

    monkeypatch.setattr(Pump, "stay_while_busy", spy)
    app_client, relay_client = tcp_pair()
    relay_upstream, app_server = tcp_pair()
    for sock in (relay_client, relay_upstream):
        sock.setblocking(False)
    stop = threading.Event()
    async with trio.open_nursery() as nursery:
        relay = Pump(lambda *ended: None, impl=impl)
        nursery.start_soon(relay.run)
        relay.add(relay_client, relay_upstream, "t", idle_timeout=60, half_closed_timeout=60)
        app_server.sendall(b"small")
        assert await trio.to_thread.run_sync(app_client.recv, 5) == b"small"
        await trio.sleep(0.05)
        assert moved_before_stays == []
        threads = paced_stream(app_server, app_client, stop, seconds=1.0)
        with trio.move_on_after(30):
            while not moved_before_stays:
                await trio.sleep(0.01)
        stop.set()
        await trio.to_thread.run_sync(lambda: [thread.join(10) for thread in threads])
        nursery.cancel_scope.cancel()
    app_client.close()
    assert moved_before_stays
    assert all(BULK_RUN <= moved < BATCHED_RUN for moved in moved_before_stays)
