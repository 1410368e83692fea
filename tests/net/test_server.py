"""The server's accept-to-dial path without a task: what a bug or a shortage there may cost."""

import errno
import socket

import pytest

from relay.config import Config
from relay.metrics import Metrics
from relay.net.server import Server
from relay.proto.sniff import Sniffer
from tests.sockpairs import tcp_pair


def served(upstream: str = "127.0.0.1:1", **settings) -> Server:
    config = Config.from_values({"upstream": [upstream], "allow-dest": ["127.0.0.0/8"], **settings})
    return Server(config, Metrics(version="t", fast_path="python"))


def assert_ended_alone(server: Server, client, conn, slots: int, how: str) -> None:
    """The connection is reset, its slot and per-source count given back, its end counted once."""
    assert server.connections.slots.value == slots and server.connections.per_source == {}
    assert conn.fileno() == -1
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    assert f'relay_connections_ended_total{{how="{how}"}} 1' in server.metrics.render()


async def test_a_bug_while_sniffing_costs_only_that_connection(monkeypatch, caplog):
    """The client's first bytes are read and sniffed in the accept loop's call: an exception there
    must end that connection, not the accept loop."""
    server = served()
    await server.pool.resolve()  # an HTTP proxy: the client's first bytes are wanted
    monkeypatch.setattr(Sniffer, "receive_data", lambda self, data: [][0])
    client, conn = tcp_pair()
    client.sendall(b"\x16\x03\x01")
    slots = server.connections.slots.value
    await server.connections.slots.acquire()  # as accept_loop does
    server.connections.accepted(conn, client.getsockname())
    assert "internal error while relaying" in caplog.text
    assert_ended_alone(server, client, conn, slots, "error")
    server.connections.waiting.close()


async def test_a_dial_the_dialer_cannot_watch_ends_once_as_the_relays_shortage(monkeypatch):
    """epoll's watch limit while the tunnel opens: a local failure (not the proxy's), reported once;
    no deadline left to end it a second time."""
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        server = served(f"socks5://127.0.0.1:{proxy.getsockname()[1]}", sniff="off")
        await server.pool.resolve()

        class FullEpoll:
            def __init__(self, real):
                self.real = real

            def register(self, fd, events):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.real, name)

        monkeypatch.setattr(server.dialer._loop, "_epoll", FullEpoll(server.dialer._loop._epoll))
        client, conn = tcp_pair()
        slots = server.connections.slots.value
        await server.connections.slots.acquire()
        server.connections.accepted(conn, client.getsockname())
        assert_ended_alone(server, client, conn, slots, "refused:relay-enospc")
        assert len(server.dialer) == 0 and all(timer.callback is None for _, _, timer in server.dialer._loop._timers)
        server.connections.waiting.close()
