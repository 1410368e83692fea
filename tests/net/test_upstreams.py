"""Choosing among upstreams: order, turns, passive health; the probe behind --confirm-eof."""

import errno
import os
import socket
import struct
from types import SimpleNamespace

import pytest
import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net.faults import (
    Fault,
    UpstreamError,
    cancelled,
    connect_failure,
    connect_timed_out,
    handshake_failure,
    handshake_timed_out,
)
from relay.net.tunnel import make_tunnels
from relay.net.upstreams import DIRECT, Attempts, UpstreamPool, UpstreamState
from relay.proto.errors import ProxyRefused, RemoteProtocolError
from relay.proto.http_connect import HttpConnectClient


def pool(strategy="failover", failures=2):
    config = Config.from_values(
        {
            "upstream": ["10.0.0.1:3128", "socks5://10.0.0.2:1080", "10.0.0.3:3128"],
            "upstream-strategy": strategy,
            "health-failures": failures,
        }
    )
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
    timeout = connect_timed_out("10.0.0.1:3128", 5)
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


def refused(reason, host_unreachable=False):
    if reason.startswith("http-"):  # as the CONNECT client reads the proxy's answer
        return handshake_failure(http_refusal(int(reason.removeprefix("http-"))))
    return handshake_failure(ProxyRefused("x", reason, host_unreachable))


def http_refusal(status: int) -> ProxyRefused:
    client = HttpConnectClient("name.example", 443)
    with pytest.raises(ProxyRefused) as refusal:
        client.receive_data(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n".encode())
    return refusal.value


def connect_error(code):
    return connect_failure(OSError(code, os.strerror(code)), "10.0.0.1:3128")


def test_refusals_about_the_destination_are_not_proxy_faults():
    assert connect_error(errno.ECONNREFUSED).proxy_fault
    assert connect_error(errno.ECONNREFUSED).reason == "connect-econnrefused"
    shortage = connect_error(errno.EADDRNOTAVAIL)  # our shortage, not the proxy's
    assert not shortage.proxy_fault and shortage.reason == "relay-eaddrnotavail"
    assert handshake_timed_out(10).proxy_fault
    assert refused("http-407").proxy_fault and not refused("http-407").retry_by_address
    assert not refused("http-503").proxy_fault and refused("http-503").retry_by_address
    # squid's rules forbid the port or the method: asking again by address only adds a denial
    assert not refused("http-403").proxy_fault and not refused("http-403").retry_by_address
    unreachable = refused("socks5-host-unreachable", host_unreachable=True)
    assert not unreachable.proxy_fault and unreachable.retry_by_address
    assert not refused("socks5-connection-refused").retry_by_address
    assert handshake_failure(RemoteProtocolError("garbage")).proxy_fault
    assert handshake_failure(ConnectionResetError(errno.ECONNRESET, "reset")).reason == "proxy-econnreset"


def test_only_an_answer_from_the_proxy_is_a_refusal():
    assert all(refused(reason).refused for reason in ("http-403", "http-407", "socks5-connection-refused"))
    assert not handshake_failure(RemoteProtocolError("garbage")).refused
    assert not handshake_failure(ConnectionResetError(errno.ECONNRESET, "reset")).refused
    assert not connect_error(errno.ECONNREFUSED).refused and not handshake_timed_out(10).refused


def test_without_a_proxy_a_failed_connect_is_the_targets_fault():
    refused_direct = connect_failure(OSError(errno.ECONNREFUSED, "refused"), "10.9.9.9:443", direct=True)
    assert refused_direct.fault is Fault.TARGET and refused_direct.reason == "connect-econnrefused"
    assert connect_timed_out("10.9.9.9:443", 5, direct=True).fault is Fault.TARGET
    assert connect_timed_out("10.9.9.9:443", 5).fault is Fault.PROXY
    shortage = connect_failure(OSError(errno.EMFILE, "too many"), "10.9.9.9:443", direct=True)
    assert shortage.fault is Fault.RELAY


DST = ("10.9.9.9", 443)
BY_NAME = ("example.org", 443)


def attempts(upstreams, name="example.org", direct=False, by_name_only=False):
    record = SimpleNamespace(name=name, retried=None, via=None, fault=None)  # what Attempts reads and writes
    return Attempts(upstreams, upstreams.candidates(), direct, DST, record, by_name_only), record


def tried(plan):
    upstream, _, target = plan.next()
    return upstream.host, target


def test_attempts_ask_by_name_then_by_address_when_the_proxy_cannot_reach_the_name():
    upstreams = pool()
    plan, record = attempts(upstreams)
    assert tried(plan) == ("10.0.0.1", BY_NAME) and record.via.host == "10.0.0.1"
    plan.failed(refused("http-502"))
    assert tried(plan) == ("10.0.0.1", DST) and record.retried == "http-502"
    plan.failed(refused("http-502"))  # by address too: the destination's fault
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "http-502" and upstreams.states[0].failures == 0


def test_attempts_move_on_when_a_proxy_fails_and_count_it():
    upstreams = pool(failures=5)
    plan, record = attempts(upstreams)
    plan.failed(connect_error(errno.ECONNREFUSED))
    assert upstreams.states[0].failures == 1
    assert tried(plan) == ("10.0.0.2", BY_NAME) and record.via.host == "10.0.0.2"
    plan.failed(handshake_timed_out(10))
    assert tried(plan) == ("10.0.0.3", BY_NAME)
    assert plan.succeeded() is upstreams.states[2]
    upstreams.failed(upstreams.states[2], handshake_timed_out(10))
    plan.failed(refused("socks5-connection-refused"))  # the destination refused: no use elsewhere
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "socks5-connection-refused"


def test_attempts_end_with_the_last_proxy_failure_or_no_healthy_upstream():
    upstreams = pool()
    plan, _ = attempts(upstreams, name=None)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert tried(plan) == (host, DST)
        plan.failed(connect_failure(OSError(errno.ETIMEDOUT, "timed out"), host))
    with pytest.raises(UpstreamError, match="10.0.0.3"):
        plan.next()
    for state in upstreams.states:
        state.healthy = False
    plan, _ = attempts(upstreams)
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "no-healthy-upstream"


def test_attempts_direct_is_one_attempt_by_address():
    upstreams = pool()
    plan, record = attempts(upstreams, direct=True)
    assert plan.next() == (DIRECT, [], DST) and record.via is DIRECT
    plan.failed(connect_error(errno.ECONNREFUSED))
    with pytest.raises(UpstreamError):
        plan.next()
    assert plan.succeeded() is None and all(state.failures == 0 for state in upstreams.states)


def test_attempts_ask_socks4_by_address_only():
    config = Config.from_values({"upstream": ["socks4://10.0.0.4:1080"]})
    upstreams = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    upstreams.states = [UpstreamState(config.upstreams[0], [(2, ("10.0.0.4", 1080))])]
    plan, _ = attempts(upstreams)
    assert tried(plan) == ("10.0.0.4", DST)


def test_a_fake_destination_is_asked_by_name_only_and_never_raced():
    """Its address means nothing beyond the relay: a proxy that cannot reach the name ends it there."""
    upstreams = pool()
    plan, record = attempts(upstreams, by_name_only=True)
    assert tried(plan) == ("10.0.0.1", BY_NAME) and not plan.may_race()
    plan.failed(refused("http-502"))
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "http-502" and record.retried is None


def test_a_fake_destination_skips_upstreams_that_take_no_names_and_is_never_direct():
    config = Config.from_values({"upstream": ["socks4://10.0.0.4:1080", "socks5://10.0.0.5:1080"]})
    upstreams = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    upstreams.states = [UpstreamState(upstream, [(2, (upstream.host, 1080))]) for upstream in config.upstreams]
    plan, _ = attempts(upstreams, by_name_only=True)
    assert tried(plan) == ("10.0.0.5", BY_NAME)
    upstreams.states = upstreams.states[:1]
    for plan, _ in (attempts(upstreams, by_name_only=True), attempts(upstreams, direct=True, by_name_only=True)):
        with pytest.raises(UpstreamError) as ended:
            plan.next()
        assert ended.value.reason == "no-named-upstream" and ended.value.fault is Fault.RELAY


def test_a_slow_name_races_the_address_through_the_same_upstream_and_either_may_win():
    upstreams = pool()
    plan, record = attempts(upstreams)
    assert tried(plan) == ("10.0.0.1", BY_NAME) and plan.may_race()
    upstream, _, target = plan.race()
    assert (upstream.host, target) == ("10.0.0.1", DST) and not plan.may_race()
    assert plan.succeeded(racer=True) is upstreams.states[0]
    assert record.retried == "slow-name"  # the address answered first

    plan, record = attempts(upstreams)
    plan.race()
    assert plan.succeeded() is upstreams.states[0] and record.retried is None  # the name did: it was used


def test_no_race_by_address_or_without_a_proxy():
    upstreams = pool()
    assert not attempts(upstreams, name=None)[0].may_race()
    assert not attempts(upstreams, direct=True)[0].may_race()
    plan, _ = attempts(upstreams)
    plan.failed(refused("http-502"))  # asked by address in turn: nothing left to race
    assert tried(plan) == ("10.0.0.1", DST) and not plan.may_race()


def test_in_a_race_one_failure_waits_for_the_other():
    upstreams = pool()
    plan, record = attempts(upstreams)
    plan.race()
    assert plan.failed(refused("http-500")) is False  # the name failed: the address goes on, nothing to dial
    assert record.retried == "http-500"  # why the address was needed, as when asked in turn
    assert plan.succeeded(racer=True) is upstreams.states[0] and record.retried == "http-500"

    plan, record = attempts(upstreams)
    plan.race()
    assert plan.failed(refused("http-502"), racer=True) is False
    assert plan.succeeded() is upstreams.states[0] and record.retried is None


def test_a_race_both_failing_ends_with_what_the_proxy_said_of_the_destination():
    upstreams = pool(failures=5)
    plan, record = attempts(upstreams)
    plan.race()
    plan.failed(refused("http-503"))
    assert plan.failed(refused("http-502"), racer=True) is True
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "http-502" and record.fault is Fault.TARGET  # the address's: the client's own
    assert upstreams.states[0].failures == 0

    plan, record = attempts(upstreams)  # the name timed out, the address was refused by the far side
    plan.race()
    plan.failed(refused("http-502"), racer=True)
    assert plan.failed(handshake_timed_out(10)) is True
    with pytest.raises(UpstreamError) as ended:
        plan.next()
    assert ended.value.reason == "http-502" and record.fault is Fault.TARGET
    assert upstreams.states[0].failures == 1  # the timeout still counts against the proxy, once


def test_a_race_both_failing_on_the_proxy_counts_once_and_moves_on():
    upstreams = pool(failures=5)
    plan, record = attempts(upstreams)
    plan.race()
    plan.failed(handshake_timed_out(10))
    assert plan.failed(handshake_timed_out(10), racer=True) is True
    assert upstreams.states[0].failures == 1
    assert tried(plan) == ("10.0.0.2", BY_NAME) and plan.may_race() and record.fault is Fault.PROXY


class FakeTunnel:
    up = False


def probed(listener, answer: bytes | None) -> bytes:
    """Accept the probe's connection and read its request; then ``answer`` and a close (None: a
    reset, as a program closing with the request unread does)."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(2)
        request = conn.recv(100)
        if answer is None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(answer)
    return request


async def probe_against(scheme: str, answer: bytes | None):
    config = Config.from_values({"upstream": [f"{scheme}://127.0.0.1:1"], "connect-timeout": 2})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        state = UpstreamState(config.upstreams[0], [(socket.AF_INET, listener.getsockname())], config=config)
        proxy_side = []

        async def proxy():
            proxy_side.append(await trio.to_thread.run_sync(probed, listener, answer))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy)
            alive = await state.still_there()
    return alive, proxy_side[0]


@pytest.mark.parametrize(
    "scheme, request_, answer",
    [
        ("http", b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        ("socks5", b"\x05\x01\x00", b"\x05\x00"),
        ("socks4", b"\x05\x01\x00", b""),  # a SOCKS4-only server closing: a program answered all the same
    ],
)
async def test_still_there_asks_a_question_the_proxy_answers_itself(scheme, request_, answer):
    assert await probe_against(scheme, answer) == (True, request_)


async def test_still_there_takes_a_reset_before_any_answer_for_gone():
    assert await probe_against("socks5", None) == (False, b"\x05\x01\x00")


async def test_still_there_sees_a_dying_listener_that_still_completes_handshakes():
    """A killed proxy's tunnels may end before its listening socket does: a probe connects, but
    the kernel resets it when the listener closes with the probe unaccepted."""
    config = Config.from_values({"upstream": ["127.0.0.1:1"], "connect-timeout": 2})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    state = UpstreamState(config.upstreams[0], [(socket.AF_INET, listener.getsockname())], config=config)
    async with trio.open_nursery() as nursery:
        answers = []

        async def ask():
            answers.append(await state.still_there())

        nursery.start_soon(ask)
        await trio.sleep(0.1)  # connected, request sent, nobody reading
        listener.close()
    assert answers == [False]
    assert await state.still_there() is False  # now refused outright


async def test_still_there_without_a_proxy_or_with_its_tunnel_down():
    config = Config.from_values({"upstream": ["direct", "127.0.0.1:1"], "confirm-eof": "on"})
    assert UpstreamState(config.upstreams[0], [], config=config).still_there is None  # a FIN is the server's
    state = UpstreamState(config.upstreams[1], [(socket.AF_INET, ("127.0.0.1", 1))], config=config)
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


async def test_a_health_check_cut_short_by_shutdown_says_nothing_about_the_upstream(monkeypatch):
    upstreams = pool(failures=1)
    upstreams.config.health_interval = 0.01
    state = upstreams.states[0]

    async def shutting_down(_state):
        raise cancelled()

    monkeypatch.setattr(upstreams, "check", shutting_down)
    with trio.fail_after(2):
        await upstreams._check_forever(state)  # returns: no more checks once shutting down
    assert state.healthy and state.failures == 0


async def checks_made(upstreams, state, seconds=0.3) -> int:
    """How many active checks of ``state`` its check loop makes in ``seconds`` (each succeeds)."""
    made = []

    async def check(checked):
        made.append(checked)

    upstreams.check = check
    with trio.move_on_after(seconds):
        await upstreams._check_forever(state)
    return len(made)


async def test_one_upstream_is_checked_only_while_it_is_marked_down():
    """Alone, a healthy upstream gains nothing from checks (failing connections mark it down, and
    there is nowhere else to go): each would cost a line in its proxy's log."""
    upstreams = pool()
    upstreams.states = upstreams.states[:1]
    upstreams.config.health_interval = 0.01
    [state] = upstreams.states
    assert await checks_made(upstreams, state) == 0
    state.healthy = False
    assert await checks_made(upstreams, state) == 1 and state.healthy  # found back, then left alone


async def test_several_upstreams_are_each_checked_while_healthy():
    upstreams = pool()
    upstreams.config.health_interval = 0.01
    assert await checks_made(upstreams, upstreams.states[1]) > 3


def proxy_on_loopback(scheme: str, **settings):
    config = Config.from_values({"upstream": [f"{scheme}://127.0.0.1:1"], "handshake-timeout": 2, **settings})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    upstreams = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    state = UpstreamState(config.upstreams[0], [(socket.AF_INET, listener.getsockname())])
    return listener, upstreams, state


def played(listener, answer: bytes | None, close_after_answer: bool) -> tuple[bytes, bytes | str]:
    """Accept one check, read its question, answer (None: say nothing); then what the check did:
    b"" for a clean close, "reset", or what else it sent."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        question = conn.recv(100)
        if answer is not None:
            conn.sendall(answer)
            if close_after_answer:
                conn.shutdown(socket.SHUT_WR)
        try:
            after = conn.recv(100)
        except ConnectionResetError:
            after = "reset"
    return question, after


@pytest.mark.parametrize(
    "scheme, question, answer, close_after_answer",
    [
        ("http", b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", True),
        ("socks5", b"\x05\x01\x00", b"\x05\x00", False),  # it then waits for a request: the check closes
    ],
)
async def test_a_check_is_a_question_the_proxy_answers_itself_then_a_clean_close(
    scheme, question, answer, close_after_answer
):
    """Not a bare connect: squid logs one of those as error:transaction-end-before-headers. A
    request squid answers without going anywhere (a 400 to a request without a host), read to
    its end, then a FIN: a whole exchange in its log."""
    listener, upstreams, state = proxy_on_loopback(scheme)
    with listener:
        seen = []

        async def proxy():
            seen.append(await trio.to_thread.run_sync(played, listener, answer, close_after_answer))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy)
            await upstreams.check(state)
    assert seen == [(question, b"")]


@pytest.mark.parametrize("answer, reason", [(None, "handshake-timeout"), (b"", "proxy-closed")])
async def test_a_proxy_that_accepts_but_does_not_answer_fails_its_check(answer, reason):
    """e.g. ssh -L whose far side is gone: ssh accepts, then closes; or a hung proxy."""
    listener, upstreams, state = proxy_on_loopback("http", **{"handshake-timeout": 0.3})
    with listener:

        async def proxy():
            await trio.to_thread.run_sync(played, listener, answer, True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy)
            with pytest.raises(UpstreamError) as failed:
                await upstreams.check(state)
    assert failed.value.reason == reason and failed.value.proxy_fault


async def test_lanes_of_one_upstream_are_tried_least_busy_first_after_the_upstreams_before_them():
    """--ssh-connections: one state per ssh tunnel; failover keeps the upstreams' order, and among one upstream's
    lanes the one carrying the fewest connections comes first."""
    config = Config.from_values(
        {"upstream": ["10.0.0.1:3128", "socks5://127.0.0.1:1080"], "ssh": "far", "ssh-connections": 3}
    )
    tunnels = make_tunnels(config)
    assert [tunnel.label for tunnel in tunnels] == [
        *(f"http://10.0.0.1:3128#{lane}" for lane in (1, 2, 3)),
        *(f"socks5://127.0.0.1:1080#{lane}" for lane in (1, 2, 3)),
    ]
    # -D: the first lane where the configuration puts the SOCKS5 proxy, the others on ports of their own.
    socks = [tunnel.local_address for tunnel in tunnels[3:]]
    assert socks[0] == ("127.0.0.1", 1080) and len(set(socks)) == 3
    upstreams = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    await upstreams.resolve(tunnels)
    assert [state.tunnel for state in upstreams.states] == tunnels
    http_lanes = upstreams.states[:3]
    for state in upstreams.states:
        state.tunnel._up = True
    http_lanes[0].active, http_lanes[1].active, http_lanes[2].active = 4, 1, 2
    assert upstreams.candidates()[:4] == [http_lanes[1], http_lanes[2], http_lanes[0], upstreams.states[3]]
    for _ in range(config.health_failures):
        upstreams.failed(http_lanes[1], connect_timed_out("127.0.0.1:1", 5))
    assert upstreams.candidates()[:2] == [http_lanes[2], http_lanes[0]]  # the unhealthy lane is left out
    assert 'relay_upstream_healthy{upstream="http://10.0.0.1:3128#2"} 0' in upstreams.metrics.render()


def test_one_ssh_connection_per_upstream_keeps_the_plain_labels():
    config = Config.from_values({"upstream": ["10.0.0.1:3128"], "ssh": "far", "ssh-connections": 1})
    [tunnel] = make_tunnels(config)
    assert tunnel.label == "http://10.0.0.1:3128" and tunnel.upstream == config.upstreams[0]
