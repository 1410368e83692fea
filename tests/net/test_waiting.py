"""The waiting room: accepted connections waiting for their first bytes without a task each."""

import errno
import os
import socket

import pytest
import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net import waiting
from relay.net.server import Server
from relay.net.waiting import WaitingRoom
from tests.sockpairs import hard_close, tcp_pair


class Room:
    """A WaitingRoom whose run() goes on in the test's nursery, recording what it starts."""

    def __init__(self, nursery, silent_at_once=64):
        self.started, self.abandoned = [], []
        self.room = WaitingRoom(
            lambda conn, name, spoke: self.started.append((name, spoke)),
            lambda conn, name: self.abandoned.append(name),
            silent_at_once,
        )
        self.clients = []
        nursery.start_soon(self.room.run)

    async def until_started(self, count=1):
        with trio.fail_after(2):
            while len(self.started) < count:
                await trio.sleep(0.005)

    def add(self, name, wait):
        client, conn = tcp_pair()
        self.clients.append((client, conn))
        self.room.add(conn, name, trio.current_time() + wait)
        return client, conn


async def test_a_client_that_speaks_leaves_at_once_with_its_bytes_unread():
    async with trio.open_nursery() as nursery:
        room = Room(nursery)
        client, conn = room.add("tls", wait=10)
        await trio.sleep(0.05)
        assert room.started == [] and len(room.room) == 1
        client.sendall(b"\x16\x03\x01")
        await room.until_started()
        assert room.started == [("tls", True)] and len(room.room) == 0
        assert conn.recv(10) == b"\x16\x03\x01"  # for the task's sniffing
        room.room.close()


async def test_a_fin_or_a_reset_counts_as_speaking():
    async with trio.open_nursery() as nursery:
        room = Room(nursery)
        fin, _ = room.add("fin", wait=10)
        rst, _ = room.add("rst", wait=10)
        fin.shutdown(1)
        hard_close(rst)
        await room.until_started(2)
        assert sorted(room.started) == [("fin", True), ("rst", True)]
        room.room.close()


async def test_a_silent_client_leaves_when_its_wait_is_over_and_not_before():
    async with trio.open_nursery() as nursery:
        room = Room(nursery)
        begun = trio.current_time()
        room.add("ssh", wait=0.2)
        await room.until_started()
        assert room.started == [("ssh", False)]
        assert 0.2 <= trio.current_time() - begun < 0.5
        room.room.close()


async def test_a_shorter_wait_added_later_is_kept():
    """After a reload shortens --sniff-timeout, a newer connection's wait ends first."""
    async with trio.open_nursery() as nursery:
        room = Room(nursery)
        room.add("old", wait=5)
        await trio.sleep(0.05)  # run() now sleeps until the old deadline
        room.add("new", wait=0.1)
        await room.until_started()
        assert room.started == [("new", False)]
        room.room.close()
        assert room.abandoned == ["old"]


async def test_silent_connections_start_a_few_at_a_time_in_order(monkeypatch):
    monkeypatch.setattr(waiting, "PATIENCE", 60)
    async with trio.open_nursery() as nursery:
        room = Room(nursery, silent_at_once=3)
        for number in range(7):
            room.add(number, wait=0.05)
        await trio.sleep(0.3)
        assert room.started == [(0, False), (1, False), (2, False)]
        assert len(room.room) == 4  # still this room's: waiting for a turn
        room.room.done_silent()
        assert room.started[3:] == [(3, False)]
        for _ in range(3):
            room.room.done_silent()
        assert [name for name, _ in room.started] == list(range(7))
        room.room.close()


async def test_no_silent_connection_waits_for_its_turn_past_the_patience(monkeypatch):
    """Dials that never finish (a blackholed destination) hold back the others only so long."""
    monkeypatch.setattr(waiting, "PATIENCE", 0.2)
    async with trio.open_nursery() as nursery:
        room = Room(nursery, silent_at_once=1)
        room.add("slow", wait=0.01)
        await room.until_started()
        room.add("next", wait=0.01)
        await trio.sleep(0.1)
        assert room.started == [("slow", False)]  # its turn has not come, and the patience lasts
        begun = trio.current_time()
        await room.until_started(2)
        assert room.started[1] == ("next", False) and trio.current_time() - begun < 0.3
        room.room.close()


async def test_the_turns_hold_past_the_patience_while_dials_finish(monkeypatch):
    """A long queue that moves (thousands of idle clients at once) keeps to its turns."""
    monkeypatch.setattr(waiting, "PATIENCE", 0.1)
    async with trio.open_nursery() as nursery:
        room = Room(nursery, silent_at_once=1)
        for number in range(4):
            room.add(number, wait=0.01)
        await room.until_started()
        for expected in range(2, 5):
            await trio.sleep(0.06)  # within the patience of the last finished dial
            room.room.done_silent()
            assert len(room.started) == expected  # one more per finished dial, never all at once
        room.room.close()


async def test_a_stale_deadline_does_not_expire_a_newer_connection_on_the_same_fd(caplog):
    async with trio.open_nursery() as nursery:
        room = Room(nursery)
        client, conn = room.add("first", wait=0.2)
        client.sendall(b"x")
        await room.until_started()
        fd = conn.fileno()
        again, other = tcp_pair()  # before the close: none of these gets that fd number
        conn.close()
        os.dup2(other.fileno(), fd)  # the new connection gets the fd number just freed
        other.close()
        conn = socket.socket(fileno=fd)
        room.clients.append((again, conn))
        room.room.add(conn, "second", trio.current_time() + 10)
        await trio.sleep(0.4)  # past the first connection's deadline
        assert room.started == [("first", True)] and "internal error" not in caplog.text
        room.room.close()
        assert room.abandoned == ["second"]


async def test_close_abandons_what_is_left_and_ends_run(monkeypatch):
    monkeypatch.setattr(waiting, "PATIENCE", 60)
    async with trio.open_nursery() as nursery:
        room = Room(nursery, silent_at_once=1)
        room.add("waiting", wait=10)
        room.add("due-1", wait=0.01)
        room.add("due-2", wait=0.01)
        await trio.sleep(0.2)
        assert room.started == [("due-1", False)]
        room.room.close()
        assert sorted(room.abandoned) == ["due-2", "waiting"] and len(room.room) == 0
        room.room.done_silent()  # the started one ends after the close: nothing more starts
        assert room.started == [("due-1", False)]
    # run() returned by itself: the nursery closed without a cancel.


async def test_a_connection_the_room_cannot_take_costs_only_itself(monkeypatch):
    """epoll's watch limit at accept time: that client is reset, its slot and count given back,
    and the accept loop that called in goes on."""
    config = Config.from_values({"upstream": ["127.0.0.1:1"], "allow-dest": ["127.0.0.0/8"]})
    server = Server(config, Metrics(version="t", fast_path="python"))
    await server.pool.resolve()  # an HTTP proxy: the client's first bytes are wanted
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(server.connections.waiting, "add", lambda *args: (_ for _ in ()).throw(full))
    client, conn = tcp_pair()
    slots = server.connections.slots.value
    await server.connections.slots.acquire()  # as accept_loop does
    server.connections.accepted(conn, client.getsockname())
    assert server.connections.slots.value == slots and server.connections.per_source == {}
    assert conn.fileno() == -1
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    assert 'relay_connections_ended_total{how="relay-enospc"} 1' in server.metrics.render()
    server.connections.waiting.close()
