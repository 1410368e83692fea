"""--engine sockmap (relay.net.sockmap) where it differs from splice: what it declines, what it bounds.

The cases both engines share (integrity both ways, half-close, resets, timeouts, cancel) are in
test_pump.py, run with each engine.
"""

import contextlib
import errno
import hashlib
import logging
import os
import socket

import pytest
import trio

from relay.net import sockmap
from relay.net.pump import Pump
from tests.net.test_pump import read_to_eof, send_then_eof, trio_pair
from tests.pumping import pump
from tests.root import require_root


@pytest.fixture(autouse=True)
def root():
    require_root("the sockmap engine needs CAP_BPF and CAP_NET_ADMIN")


def test_the_verdict_program_is_whole_instructions_naming_the_map():
    code = sockmap.verdict_program(map_fd=7)
    assert len(code) % 8 == 0 and code[-8] == 0x95  # ends with exit
    assert code[32] == 0x18 and code[33] == 0x12 and int.from_bytes(code[36:40], "little") == 7


async def test_a_reader_that_stops_is_reset_at_the_backlog_bound(impl, monkeypatch):
    """The kernel queues redirected bytes without bound (no backpressure): the sweep resets instead."""
    app_client, relay_client = trio_pair()
    relay_upstream, app_server = trio_pair()
    app_server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
    chunk = bytes(1 << 16)

    async def flood():
        with pytest.raises(OSError) as caught:
            while True:
                await app_client.send(chunk)
        assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            result = await pump(relay_client, relay_upstream, impl=impl, engine="sockmap", max_backlog=4 << 20)
    assert result.ended == "relay-backlog-full"
    assert result.sent_up < 64 << 20  # what went into the upstream's send queue before the reset
    for sock in (app_client, app_server):
        sock.close()


@contextlib.asynccontextmanager
async def sockmap_pump(impl, seconds: float):
    """A running Pump with the sockmap engine, and the list its ends go to; cancelled on leaving."""
    ended = []
    with trio.fail_after(seconds):
        async with trio.open_nursery() as nursery:
            relay = Pump(lambda *result: ended.append(result), impl=impl, engine="sockmap")
            nursery.start_soon(relay.run)
            await trio.sleep(0)
            yield relay, ended
            nursery.cancel_scope.cancel()


async def spliced_to_the_end(impl, app_client, relay_client, relay_upstream, app_server, first: bytes):
    """Add a connection the carrier must leave to splice; both ends finish; (what the server got, ends)."""
    got = []
    async with sockmap_pump(impl, 20) as (relay, ended):
        relay.add(relay_client, relay_upstream, "t", idle_timeout=60, half_closed_timeout=60, to_upstream_first=first)
        assert len(relay.carrier) == 0 and len(relay.engine) == 1
        app_client.shutdown(socket.SHUT_WR)
        await send_then_eof(app_server, b"")
        await read_to_eof(app_server, got)
        while not ended:
            await trio.sleep(0.01)
    return got, ended


async def test_bytes_queued_before_the_handover_are_spliced(impl):
    """A socket stored with bytes queued would hold them until the next segment: it is declined."""
    app_client, relay_client = trio_pair()
    relay_upstream, app_server = trio_pair()
    await app_client.send(b"queued before the relay took it")
    await trio.sleep(0.05)
    got, ended = await spliced_to_the_end(impl, app_client, relay_client, relay_upstream, app_server, b"")
    assert got[0] == len(b"queued before the relay took it") and ended == [("t", "closed", got[0], 0)]
    for sock in (app_client, app_server):
        sock.close()


async def test_a_kernel_that_refuses_leaves_every_connection_to_splice(impl, monkeypatch, caplog):
    def refuse(self, capacity=0):
        raise OSError(errno.EPERM, "bpf(): EPERM")

    monkeypatch.setattr(sockmap.Sockmap, "__init__", refuse)
    with caplog.at_level(logging.WARNING):
        relay = Pump(lambda *ended: None, impl=impl, engine="sockmap")
    assert relay.carrier is None
    assert "--engine sockmap: the kernel refused it (bpf(): EPERM); every connection is spliced" in caplog.text
    relay.close()


async def test_first_bytes_too_big_to_write_at_once_are_finished_by_splice_and_counted_once(impl):
    app_client, relay_client = trio_pair()
    relay_upstream, app_server = trio_pair()
    first = os.urandom(16 << 20)  # more than a send buffer takes: the carrier writes part, splice the rest
    got, ended = await spliced_to_the_end(impl, app_client, relay_client, relay_upstream, app_server, first)
    assert got == [len(first), hashlib.sha256(first).hexdigest()]
    assert ended == [("t", "closed", len(first), 0)]
    for sock in (app_client, app_server):
        sock.close()


async def test_reclaim_ends_the_carried_connection_whose_client_never_spoke(impl):
    pairs = [(trio_pair(), trio_pair()) for _ in range(2)]
    async with sockmap_pump(impl, 10) as (relay, ended):
        for token, ((_, relay_client), (relay_upstream, _)) in enumerate(pairs):
            relay.add(relay_client, relay_upstream, token, idle_timeout=60, half_closed_timeout=60)
        assert len(relay.carrier) == 2
        (spoke, _), (_, server) = pairs[0]
        await spoke.send(b"hello")
        assert await server.recv(10) == b"hello"
        assert relay.reclaim("reclaimed") and ended == [(1, "reclaimed", 0, 0)]
        assert not relay.reclaim("reclaimed")  # the other one's client spoke
    for (app_client, _), (_, app_server) in pairs:
        app_client.close()
        app_server.close()


async def test_reading_the_counts_does_not_hide_activity_from_the_idle_timeout(impl):
    """Metrics read each connection's counters between sweeps: traffic seen only then is still traffic."""
    app_client, relay_client = trio_pair()
    relay_upstream, app_server = trio_pair()
    async with sockmap_pump(impl, 10) as (relay, ended):
        relay.add(relay_client, relay_upstream, "t", idle_timeout=0.6, half_closed_timeout=60)
        for _ in range(8):  # 8 x 0.25 s: longer than the idle timeout; only the traffic keeps it
            await app_client.send(b"x")
            assert await app_server.recv(10) == b"x"
            assert relay.counts()[0][0] == "t"  # as a metrics scrape would, right after the byte
            await trio.sleep(0.25)
        assert not ended
    for sock in (app_client, app_server):
        sock.close()
