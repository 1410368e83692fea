"""Limits from the hardening work: connection budget, per-source cap, half-closed timeout,
destination policy."""

import select
import socket
import time

import pytest

from relay.lab import ADDR
from relay.lab.servers import BannerServer
from tests.e2e.clients import connect, connect_expecting_reset, expect_reset
from tests.e2e.conftest import BANNER_PORT, UPSTREAMS

DANTE = UPSTREAMS["dante"]
SECOND_CLIENT = "10.77.1.3"


def banner_connection(lab, source=None):
    sock = lab.socket("client")
    sock.settimeout(5)
    if source:
        sock.bind((source, 0))
    sock.connect((ADDR.server4, BANNER_PORT))
    return sock


def spoken_banner_connection(lab):
    """A connection whose client has spoken: the relay never reclaims its slot."""
    sock = banner_connection(lab)
    assert sock.recv(100) == BannerServer.banner
    sock.sendall(b"hello")
    assert sock.recv(100) == b"hello"  # echoed: the relay moved the client's byte
    return sock


def test_past_the_budget_clients_wait_in_the_backlog(run_relay, lab):
    relay = run_relay(DANTE, "--max-connections", "2", "--listen", "0.0.0.0:12345")
    held = [spoken_banner_connection(lab) for _ in range(2)]
    waiting = banner_connection(lab)  # the kernel completes the handshake; the relay does not accept yet
    waiting.settimeout(1)
    with pytest.raises(socket.timeout):
        waiting.recv(100)
    held.pop().close()
    waiting.settimeout(3)
    assert waiting.recv(100) == BannerServer.banner  # served once a slot is free, not reset
    for sock in [*held, waiting]:
        sock.close()
    assert relay.connections(at_least=2)


def test_a_client_waiting_past_the_budget_reclaims_a_silent_connections_slot(run_relay, lab, figures):
    """Silent connections from one host held every slot until the idle timeout (600 s)."""
    relay = run_relay(DANTE, "--max-connections", "3", "--listen", "0.0.0.0:12345")
    spoken = spoken_banner_connection(lab)
    silent = [banner_connection(lab) for _ in range(2)]  # the server speaks; these clients never do
    for sock in silent:
        assert sock.recv(100) == BannerServer.banner
    started = time.monotonic()
    with banner_connection(lab) as newcomer:
        assert newcomer.recv(100) == BannerServer.banner  # at once, not after the idle timeout
    figures("newcomer past the budget served after", f"{(time.monotonic() - started) * 1000:.0f} ms")
    readable, _, _ = select.select(silent, [], [], 2)
    assert len(readable) == 1  # one of them (their banners came in the same instant), not both
    expect_reset(readable[0], within=2)
    for sock in (spoken, *(sock for sock in silent if sock is not readable[0])):
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"
    assert [line["end"] for line in relay.connections(at_least=2)].count("reclaimed") == 1
    for sock in [spoken, *silent]:
        sock.close()


@pytest.mark.parametrize(
    "args,cap",
    [
        (["--max-per-source", "2"], 2),
        # 3400 silent connections from one address filled the default budget: others waited 600 s.
        (["--max-connections", "1200"], 300),  # by default a quarter of the budget per client address
    ],
)
def test_per_source_cap_leaves_other_clients_served(run_relay, lab, args, cap):
    lab.run("client", ["ip", "addr", "add", f"{SECOND_CLIENT}/24", "dev", ADDR.client_if])
    held = []
    try:
        relay = run_relay(DANTE, *args)
        held.extend(banner_connection(lab) for _ in range(cap))
        for sock in held:
            assert sock.recv(100) == BannerServer.banner
        connect_expecting_reset(lab, "client", ADDR.server4, BANNER_PORT, within=2)
        with banner_connection(lab, source=SECOND_CLIENT) as other:
            assert other.recv(100) == BannerServer.banner
        assert relay.wait_for_log(f"{cap} connections from {ADDR.client4} already (--max-per-source)")
    finally:
        for sock in held:
            sock.close()
        lab.run("client", ["ip", "addr", "del", f"{SECOND_CLIENT}/24", "dev", ADDR.client_if])


def test_half_closed_and_silent_ends_by_the_half_closed_timeout(run_relay, lab):
    silent = lab.socket("server")
    silent.bind((ADDR.server4, 7300))
    silent.listen(4)  # accepted by the kernel; never read, never answered, never closed
    relay = run_relay(DANTE, "--half-closed-timeout", "1", "--idle-timeout", "60")
    with connect(lab, port=7300) as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        took = expect_reset(sock, within=5)
    assert 0.8 < took < 3.5
    assert relay.connections(at_least=1)[0]["end"] == "half-closed-timeout"
    silent.close()


@pytest.mark.parametrize("address,port", [(ADDR.router_lan4, 80), ("169.254.169.254", 80), (ADDR.router_wan4, 22)])
def test_destinations_meaning_the_router_itself_are_refused(run_relay, lab, address, port):
    relay = run_relay(DANTE)
    connect_expecting_reset(lab, "client", address, port, within=2)
    assert relay.wait_for_log(f"-> {address}:{port}: ")
    assert relay.connections() == []  # no upstream connection was tried


def test_allow_dest_opens_an_exception(run_relay, lab):
    relay = run_relay(DANTE, "--allow-dest", "169.254.169.254/32", "--handshake-timeout", "3")
    with connect(lab, "169.254.169.254", 80) as sock:
        expect_reset(sock, within=10)  # dante cannot reach it: refused by the proxy, not by the policy
    [line] = relay.connections(at_least=1)
    assert line["end"].startswith("refused:") and line["end"] != "refused:destination"
