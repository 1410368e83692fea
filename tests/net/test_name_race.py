"""A sniffed name the proxy is slow to answer: after --name-wait the address is asked too, through
the same upstream, and the first tunnel to open is used; against an HTTP proxy played by the test
on loopback (the e2e suite has squid slow to fail a name for real)."""

import errno
import socket
from contextlib import asynccontextmanager
from typing import NamedTuple

import pytest
import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net import dial
from relay.net.connections import Connections
from relay.net.server import Server
from tests.conn_lines import conn_lines
from tests.net.fake_connect_proxy import NAME, FakeProxy
from tests.net.serving import serving
from tests.proto.test_sniff import client_hello

HELLO = client_hello(NAME)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def relaying(answers: dict[str, str], upstreams_before=(), handshake_timeout=30.0, early_data="off"):
    """A FakeProxy answering so, after ``upstreams_before``; yields a Relaying."""
    proxy = FakeProxy(answers)
    async with trio.open_nursery() as nursery:
        where = await nursery.start(proxy.serve)
        upstream = f"127.0.0.1:{where[1]}"
        upstreams = [*upstreams_before, upstream]
        async with relay_through(upstreams, handshake_timeout, early_data) as (connections, connect, lines):
            yield Relaying(proxy, f"http://{upstream}", connections, connect, lines)
        nursery.cancel_scope.cancel()


class Relaying(NamedTuple):
    proxy: FakeProxy
    upstream: str  # as the log line shows it
    connections: Connections
    connect: object  # hands the relay a client speaking TLS for NAME; returns the client's socket
    lines: list  # the connections' log lines


@asynccontextmanager
async def relay_through(upstreams: list[str], handshake_timeout: float, early_data: str = "off"):
    """A relay's connections with ``upstreams`` (--name-wait 0.1 s), and a function that hands it
    one client speaking TLS for NAME; yields (connections, connect, lines)."""
    config = Config.from_values(
        {
            "upstream": upstreams,
            "allow-dest": ["127.0.0.0/8"],
            "name-wait": "0.1",
            "handshake-timeout": handshake_timeout,
            "early-data": early_data,
        }
    )
    server = Server(config, Metrics(version="t", fast_path="python"))
    await server.pool.resolve()
    connections = server.connections
    destination = socket.socket()  # the address the client dialled; the fake proxy plays the server
    destination.bind(("127.0.0.1", 0))
    destination.listen(4)
    clients = []

    async def connect() -> trio.socket.SocketType:
        client = socket.create_connection(destination.getsockname())
        clients.append(client)
        conn, peer = destination.accept()
        client.sendall(HELLO)
        await connections.slots.acquire()  # as accept_loop does
        connections.accepted(conn, peer)
        return trio.socket.from_stdlib_socket(client)

    try:
        with conn_lines() as lines:
            async with serving(server):
                yield connections, connect, lines
    finally:
        destination.close()
        for client in clients:
            client.close()


async def greeting(client) -> bytes:
    """What the server said first, through the tunnel that won (bounded far below the handshake timeout)."""
    with trio.fail_after(10):
        data = b""
        while not data.endswith(b"\n"):
            chunk = await client.recv(100)
            assert chunk, data
            data += chunk
    return data.rstrip(b"\n")


async def ended(connections, client) -> None:
    client.close()
    with trio.fail_after(5):
        while len(connections):
            await trio.sleep(0.01)


async def test_the_address_wins_when_the_proxy_is_slow_to_answer_for_the_name():
    async with relaying({"name": "silent", "address": "ok"}) as relay:
        client = await relay.connect()
        data = await greeting(client)
        assert data.startswith(b"hello from 127.0.0.1:")  # the address's tunnel, and only its bytes
        with trio.fail_after(5):
            await relay.proxy.closed["name"].wait()  # the slow one is closed once the other won
        await ended(relay.connections, client)
    assert relay.proxy.asked[0].startswith(f"{NAME}:") and len(relay.proxy.asked) == 2
    [line] = relay.lines
    assert line["name"] == NAME and line["retried-by-ip"] == "slow-name" and line["end"] == "closed"


async def test_the_name_wins_if_it_answers_first_after_the_address_was_asked():
    async with relaying({"name": "after address", "address": "silent"}) as relay:
        client = await relay.connect()
        assert (await greeting(client)).startswith(f"hello from {NAME}:".encode())
        with trio.fail_after(5):
            await relay.proxy.closed["address"].wait()
        await ended(relay.connections, client)
    [line] = relay.lines
    assert line["name"] == NAME and "retried-by-ip" not in line and line["end"] == "closed"


async def test_a_race_after_an_upstream_refused_at_once_still_closes_the_loser(caplog, monkeypatch):
    """The first upstream refuses inside open() (connect() itself failing, as it may for a route
    that is gone): the attempt on the second, started from that failure, is the one a won race
    must close."""
    refusing = ("127.0.0.1", closed_port())
    real = dial.connected_at_once

    def refused_at_once(sock, address):
        if address == refusing:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        return real(sock, address)

    monkeypatch.setattr(dial, "connected_at_once", refused_at_once)
    async with relaying({"name": "silent", "address": "ok"}, [f"127.0.0.1:{refusing[1]}"]) as relay:
        client = await relay.connect()
        await greeting(client)
        with trio.fail_after(5):
            await relay.proxy.closed["name"].wait()
        await ended(relay.connections, client)
    assert "internal error" not in caplog.text
    [line] = relay.lines
    assert line["end"] == "closed" and line["via"] == relay.upstream


async def test_both_failing_ends_once_with_what_the_proxy_said_of_the_address():
    """The name times out (the proxy's fault: counted once against it), the address is refused by
    the far side (the target's): the connection ends with the refusal."""
    async with relaying({"name": "silent", "address": "refuse"}, handshake_timeout=0.5) as relay:
        await relay.connect()
        with trio.fail_after(5):
            while len(relay.connections):
                await trio.sleep(0.01)
        [state] = relay.connections.pool.states
        assert state.failures == 1 and state.healthy
    [line] = relay.lines
    assert line["end"] == "refused:http-503" and line["fault"] == "target" and line["retried-by-ip"] == "slow-name"
    failed = relay.connections.metrics.attempts_failed
    assert failed == {(relay.upstream, "proxy"): 1, (relay.upstream, "target"): 1}


async def tunnel_ends(relay, client, kinds) -> None:
    await ended(relay.connections, client)
    with trio.fail_after(5):
        for kind in kinds:
            await relay.proxy.closed[kind].wait()


@pytest.mark.parametrize("early_data", ["on", "off"])
async def test_early_data_goes_with_the_connect_and_once(early_data):
    async with relaying({"name": "ok", "address": "silent"}, early_data=early_data) as relay:
        client = await relay.connect()
        assert (await greeting(client)).startswith(f"hello from {NAME}:".encode())
        await tunnel_ends(relay, client, ["name"])
    assert relay.proxy.received == [("name", HELLO)]  # with the CONNECT or through the tunnel: once
    [head] = relay.proxy.heads
    assert (b"\r\nConnection: close" in head) is (early_data == "on")
    [line] = relay.lines
    assert line.get("early-data") == (len(HELLO) if early_data == "on" else None)
    assert line["up"] == len(HELLO) and line["end"] == "closed"


async def test_a_refusal_after_early_data_is_retried_by_address_with_the_same_bytes():
    async with relaying({"name": "refuse", "address": "ok"}, early_data="on") as relay:
        client = await relay.connect()
        assert (await greeting(client)).startswith(b"hello from 127.0.0.1:")
        await tunnel_ends(relay, client, ["address"])
    assert relay.proxy.received == [("name", HELLO), ("address", HELLO)]
    assert all(b"\r\nConnection: close" in head for head in relay.proxy.heads) and len(relay.proxy.heads) == 2
    [line] = relay.lines
    assert line["retried-by-ip"] == "http-503" and line["early-data"] == len(HELLO)
    assert line["up"] == len(HELLO)


async def test_a_racer_sends_no_early_data_and_its_tunnel_gets_the_client_hello_once():
    """The by-name attempt sent the ClientHello with its CONNECT and stays silent; the address, asked
    after --name-wait, wins: its tunnel gets the ClientHello once, through the pump."""
    async with relaying({"name": "silent", "address": "ok"}, early_data="on") as relay:
        client = await relay.connect()
        assert (await greeting(client)).startswith(b"hello from 127.0.0.1:")
        await tunnel_ends(relay, client, ["name", "address"])
    assert sorted(relay.proxy.received) == [("address", HELLO), ("name", HELLO)]
    name_head, address_head = relay.proxy.heads
    assert b"Connection: close" in name_head and b"Connection" not in address_head
    [line] = relay.lines
    assert line["retried-by-ip"] == "slow-name" and "early-data" not in line and line["up"] == len(HELLO)
