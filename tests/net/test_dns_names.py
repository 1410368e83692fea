"""A connection to an address the relay's DNS service answered its client with is opened by that name at once,
without waiting for the client's first bytes; against an HTTP proxy played by the test on loopback, whose
"server" speaks first (the e2e suite has the real service, squid and dante)."""

import socket
from contextlib import asynccontextmanager

import pytest
import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net.server import Server
from tests.conn_lines import conn_lines
from tests.dns.support import response
from tests.net.fake_connect_proxy import NAME, FakeProxy
from tests.net.serving import serving
from tests.net.test_name_race import greeting
from tests.proto.test_sniff import client_hello

CLIENT = "127.0.0.1"
OTHER_NAME = "other.example"
# Long enough that a connection waiting for its client's bytes would never greet within the test.
NEVER = "60"


def dns_reply(address: str, name: str = NAME) -> bytes:
    return response(f"{name}.", answer=[(f"{name}.", 300, "A", address)])


@asynccontextmanager
async def relay(server_first: bool = False, **settings):
    """A relay through a FakeProxy that opens everything; yields (server, proxy, connect, lines), where
    ``connect(first=b"")`` hands it a client that sent ``first`` before the accept, and returns the client's
    socket and how many attempts the dialer had under way right after the accept. ``server_first``: the
    destination's port is the only one in --server-first-ports (otherwise none is)."""
    proxy = FakeProxy({"name": "ok", "address": "ok"})
    destination = socket.socket()  # the address the client dialled; the fake proxy plays the server
    destination.bind((CLIENT, 0))
    destination.listen(4)
    async with trio.open_nursery() as nursery:
        where = await nursery.start(proxy.serve)
        values = {
            "upstream": [f"127.0.0.1:{where[1]}"],
            "allow-dest": ["127.0.0.0/8"],
            "sniff-timeout": NEVER,
            "server-first-ports": str(destination.getsockname()[1]) if server_first else "none",
        }
        server = Server(Config.from_values({**values, **settings}), Metrics(version="t", fast_path="python"))
        await server.pool.resolve()
        clients = []

        async def connect(first: bytes = b""):
            client = socket.create_connection(destination.getsockname())
            clients.append(client)
            conn, peer = destination.accept()
            if first:
                client.sendall(first)
            await server.connections.slots.acquire()  # as accept_loop does
            server.connections.accepted(conn, peer)
            return trio.socket.from_stdlib_socket(client), len(server.dialer)

        try:
            with conn_lines() as lines:
                async with serving(server):
                    yield server, proxy, connect, lines, destination
        finally:
            destination.close()
            for client in clients:
                client.close()
        nursery.cancel_scope.cancel()


async def finished(server, client) -> None:
    client.close()
    with trio.fail_after(5):
        while len(server.connections):
            await trio.sleep(0.01)


async def test_a_silent_client_is_opened_by_its_dns_name_before_it_says_anything():
    async with relay(**{"http-mode": "connect"}) as (server, proxy, connect, lines, destination):
        server.names.learn(CLIENT, dns_reply(CLIENT), trio.current_time())
        client, dialing = await connect()
        # Dialed at the accept itself, not after a wait: the server's greeting comes to a client that never spoke.
        assert dialing == 1
        data = await greeting(client)
        assert data.startswith(f"hello from {NAME}:".encode())
        await finished(server, client)
        assert proxy.asked == [f"{NAME}:{destination.getsockname()[1]}"]
    [line] = lines
    assert (line["name"], line["name-from"], line["end"]) == (NAME, "dns", "closed")
    assert server.metrics.named == {"dns": 1}
    assert 'relay_connections_named_total{source="dns"} 1' in server.metrics.render()


async def test_a_name_the_client_sends_before_the_accept_wins_over_the_dns_one():
    async with relay(**{"http-mode": "connect"}) as (server, proxy, connect, lines, _):
        server.names.learn(CLIENT, dns_reply(CLIENT), trio.current_time())
        client, _ = await connect(client_hello(OTHER_NAME))
        assert (await greeting(client)).startswith(f"hello from {OTHER_NAME}:".encode())
        await finished(server, client)
    [line] = lines
    assert (line["name"], line["name-from"]) == (OTHER_NAME, "sni")
    assert server.metrics.named == {"sni": 1}


async def test_plain_http_forwarding_still_waits_for_the_first_bytes_then_uses_the_dns_name():
    # Through an HTTP proxy in forward mode (the default) only the client's bytes tell plain HTTP, which must
    # go in absolute form: a silent client waits --sniff-timeout, then is opened by the DNS name.
    async with relay(**{"sniff-timeout": "0.05"}) as (server, proxy, connect, lines, _):
        server.names.learn(CLIENT, dns_reply(CLIENT), trio.current_time())
        client, dialing = await connect()
        assert dialing == 0  # in the waiting room
        assert (await greeting(client)).startswith(f"hello from {NAME}:".encode())
        await finished(server, client)
    [line] = lines
    assert line["name-from"] == "dns"


async def test_no_name_for_another_client_another_address_or_a_name_of_the_router():
    async with relay(**{"http-mode": "connect", "sniff-timeout": "0.05"}) as (server, proxy, connect, lines, _):
        now = trio.current_time()
        server.names.learn("127.0.0.2", dns_reply(CLIENT), now)  # another client's answer
        server.names.learn(CLIENT, dns_reply("127.0.0.3"), now)  # an address not dialled
        server.connections.own_names.names = frozenset({OTHER_NAME})
        dialings = []
        for learned in (None, dns_reply(CLIENT, OTHER_NAME)):
            if learned:
                server.names.learn(CLIENT, learned, now)
            client, dialing = await connect()
            dialings.append(dialing)
            assert (await greeting(client)).startswith(f"hello from {CLIENT}:".encode())
            await finished(server, client)
    assert dialings == [0, 0]  # both waited for their client's bytes, as without DNS
    assert [line.get("name") for line in lines] == [None, None]


@pytest.mark.parametrize("named", [False, True], ids=["by-address", "dns-name"])
async def test_a_silent_client_of_a_server_first_port_is_dialed_at_the_accept_even_in_forward_mode(named):
    # Forward mode (the default) would wait for a silent client (the test above); a minute, here.
    async with relay(server_first=True) as (server, proxy, connect, lines, destination):
        if named:
            server.names.learn(CLIENT, dns_reply(CLIENT), trio.current_time())
        client, dialing = await connect()
        assert dialing == 1
        target = f"{NAME if named else CLIENT}:{destination.getsockname()[1]}"
        assert await greeting(client) == f"hello from {target}".encode()
        await finished(server, client)
    assert proxy.asked == [target]
    [line] = lines
    assert line.get("name-from") == ("dns" if named else None)


async def test_a_server_first_port_still_sniffs_bytes_already_there():
    async with relay(server_first=True, **{"http-mode": "connect"}) as (server, proxy, connect, lines, destination):
        client, _ = await connect(client_hello(OTHER_NAME))
        assert await greeting(client) == f"hello from {OTHER_NAME}:{destination.getsockname()[1]}".encode()
        await finished(server, client)
    [line] = lines
    assert line["name-from"] == "sni"


async def test_bypass_domain_applies_to_dns_names():
    async with relay(**{"http-mode": "connect", "bypass-domain": ["example"]}) as (server, proxy, connect, lines, dst):
        server.names.learn(CLIENT, dns_reply(CLIENT), trio.current_time())
        client, _ = await connect()
        dst.settimeout(5)
        # Dialed directly, at once (a waiting one would not dial before --sniff-timeout, a minute).
        dst.accept()[0].close()
        await finished(server, client)
    assert proxy.asked == []
    [line] = lines
    assert (line["via"], line["name"], line["name-from"]) == ("direct", NAME, "dns")
