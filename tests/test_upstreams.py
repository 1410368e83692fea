"""Choosing among upstreams: order, turns, passive health; the probe behind --confirm-eof."""

import socket

import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net.dial import UpstreamError
from relay.net.upstreams import UpstreamPool, UpstreamState


def pool(strategy="failover", failures=2):
    config = Config.from_values({"upstream": ["10.0.0.1:3128", "socks5://10.0.0.2:1080", "10.0.0.3:3128"],
                                 "upstream-strategy": strategy, "health-failures": failures})
    upstreams = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    upstreams.states = [UpstreamState(u, [(2, (u.host, u.port))]) for u in config.upstreams]
    return upstreams


def hosts(states):
    return [state.upstream.host for state in states]


def test_failover_keeps_the_order_of_healthy_upstreams():
    upstreams = pool()
    assert hosts(upstreams.candidates()) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    upstreams.states[0].healthy = False
    assert hosts(upstreams.candidates()) == ["10.0.0.2", "10.0.0.3"]


def test_round_robin_takes_turns():
    upstreams = pool("round-robin")
    firsts = [hosts(upstreams.candidates())[0] for _ in range(6)]
    assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_proxy_failures_in_a_row_make_it_unhealthy_and_a_success_heals():
    upstreams = pool(failures=2)
    first = upstreams.states[0]
    timeout = UpstreamError("timed out", "connect-timeout")
    upstreams.failed(first, timeout)
    assert first.healthy
    upstreams.succeeded(first)  # the count is of failures in a row
    upstreams.failed(first, timeout)
    assert first.healthy
    upstreams.failed(first, timeout)
    assert not first.healthy and hosts(upstreams.candidates()) == ["10.0.0.2", "10.0.0.3"]
    assert 'relay_upstream_healthy{upstream="http://10.0.0.1:3128"} 0' in upstreams.metrics.render()
    upstreams.succeeded(first)
    assert first.healthy


def test_refusals_about_the_destination_are_not_proxy_faults():
    assert UpstreamError("x", "connect-econnrefused").proxy_fault
    assert not UpstreamError("x", "relay-eaddrnotavail").proxy_fault  # our shortage, not the proxy's
    assert UpstreamError("x", "handshake-timeout").proxy_fault
    assert UpstreamError("x", "http-407").proxy_fault
    assert not UpstreamError("x", "http-503", about_target=True).proxy_fault
    assert not UpstreamError("x", "socks5-host-unreachable", about_target=True).proxy_fault




class FakeTunnel:
    up = False


async def test_still_there_asks_the_proxy_address_itself():
    config = Config.from_values({"upstream": ["127.0.0.1:1"], "connect-timeout": 2})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        state = UpstreamState(config.upstreams[0], [(socket.AF_INET, listener.getsockname())], config=config)
        assert await state.still_there() is True  # listening: the FIN was genuine
        listener.accept()[0].close()
        listener.close()
        assert await state.still_there() is False  # gone: refused
    state.tunnel = FakeTunnel()
    assert await state.still_there() is False  # a tunnel known to be down answers without a probe


async def test_still_there_takes_a_probe_timeout_for_a_busy_proxy_not_a_dead_one():
    """A proxy whose accept queue is full drops SYNs: the probe times out (after at most 1 s), and
    the FIN it was asked about goes through as it would without --confirm-eof."""
    config = Config.from_values({"upstream": ["127.0.0.1:1"], "connect-timeout": 5})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued = []
        for _ in range(3):  # fill the accept queue; nobody accepts
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(listener.getsockname())
            queued.append(sock)
        state = UpstreamState(config.upstreams[0], [(socket.AF_INET, listener.getsockname())], config=config)
        started = trio.current_time()
        assert await state.still_there() is True
        assert 0.9 < trio.current_time() - started < 2
        for sock in queued:
            sock.close()
