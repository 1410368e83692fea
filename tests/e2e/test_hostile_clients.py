"""What a hostile LAN client tried against the relay (issue 21), end to end with the real proxy."""

import contextlib
import socket
import time
from pathlib import Path

import pytest

from relay.lab import ADDR, start_dante, start_squid
from relay.lab.netns import run_in_netns
from relay.lab.servers import BannerServer
from relay.lab.services import DANTE_DENY_OWN_MACHINE, SQUID_DENY_OWN_MACHINE
from tests.e2e.clients import connect, expect_reset
from tests.e2e.conftest import UPSTREAMS
from tests.e2e.health import usage

FAR_LOOPBACK_PORT = 7012  # served on the far host's loopback only; closed on the server
LOOPBACK_SPELLINGS = ["0x7f000001", "0X7F000001.", "0x7f.0.0.0x1", "0177.0.0.01", "127.1", "2130706433"]


@pytest.fixture(scope="module")
def far_loopback_service(lab):
    """Something only a connection to the far host's own 127.0.0.1 can reach."""
    server = BannerServer(lab, "far", "127.0.0.1", FAR_LOOPBACK_PORT)
    server.banner = b"far loopback service\r\n"
    yield server
    server.close()


@pytest.mark.parametrize("http_mode", ["connect", "forward"])
def test_a_name_spelling_loopback_is_not_asked_for(run_relay, lab, far_loopback_service, http_mode):
    """Host: 0x7f000001 passed the hostname check, so squid connected to its own loopback. The
    relay must ask for the address the client dialled instead, which has nothing on that port."""
    relay = run_relay(UPSTREAMS["squid-via-ssh-L"], "--http-mode", http_mode)
    for spelling in LOOPBACK_SPELLINGS:
        with connect(lab, ADDR.server4, FAR_LOOPBACK_PORT) as sock:
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {spelling}:{FAR_LOOPBACK_PORT}\r\nConnection: close\r\n\r\n".encode()
            )
            if http_mode == "connect":
                expect_reset(sock, within=10)  # squid cannot reach the server's closed port
            else:
                sock.settimeout(10)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503"), answer[:200]  # squid's: connection refused
    assert far_loopback_service.connections == 0
    lines = relay.connections(at_least=len(LOOPBACK_SPELLINGS))
    assert all("name" not in line and line["dst"] == f"{ADDR.server4}:{FAR_LOOPBACK_PORT}" for line in lines)


def readme_lines() -> set[str]:
    return {line.strip() for line in (Path(__file__).parents[2] / "README.md").read_text().splitlines()}


def test_readmes_squid_lines_keep_clients_off_squids_own_loopback(lab, far_loopback_service):
    """A name the far side resolves to its own loopback cannot be seen from the router; README's
    squid.conf lines must deny it at the proxy. Asked here by address, which is what such a name becomes."""
    assert set(SQUID_DENY_OWN_MACHINE) <= readme_lines()
    start_squid(lab, listen=[(ADDR.far4, 3129)], name="squid-deny-own", deny_own_machine=True)
    for target in (f"127.0.0.1:{FAR_LOOPBACK_PORT}", f"169.254.1.1:{FAR_LOOPBACK_PORT}"):
        with lab.connect("router", ADDR.far4, 3129) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 403"), target
    assert far_loopback_service.connections == 0


def test_readmes_dante_rules_keep_clients_off_dantes_own_loopback(lab, far_loopback_service):
    assert set(DANTE_DENY_OWN_MACHINE) <= readme_lines()
    dante = start_dante(lab, listen=[(ADDR.far4, 1083)], name="dante-deny-own", deny_own_machine=True)
    try:
        with lab.connect("router", ADDR.far4, 1083) as sock:
            sock.settimeout(10)
            sock.sendall(b"\x05\x01\x00")
            assert sock.recv(2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + FAR_LOOPBACK_PORT.to_bytes(2, "big"))
            reply = sock.recv(10)
    finally:
        dante.stop()
    assert reply[:2] == b"\x05\x02", reply  # "connection not allowed by ruleset"
    assert far_loopback_service.connections == 0


def test_a_flood_of_refused_destinations_grows_neither_memory_nor_the_log(run_relay, lab, figures):
    """800 000 connections to distinct 169.254.x.y:port from one client took the relay from 68 to
    157 MB and wrote a warning line for each: the limiter kept every destination forever."""
    relay = run_relay(UPSTREAMS["dante"])
    pid = lab.process(relay.name).pid
    rss_before, lines_before = usage(pid).rss_kib, relay.log_text().count("refused")
    count = 20_000

    def flood():
        for n in range(count):
            with socket.socket() as sock:
                sock.settimeout(5)
                with contextlib.suppress(ConnectionResetError):  # the relay's reset, even of connect()
                    sock.connect((f"169.254.{n >> 8 & 255}.{n & 255 or 1}", 1024 + n))
                    sock.recv(1)  # this one is done before the next

    started = time.monotonic()
    run_in_netns(lab.ns("client"), flood, timeout=300)
    took = time.monotonic() - started
    warnings = relay.log_text().count("refused") - lines_before
    grew_mib = (usage(pid).rss_kib - rss_before) / 1024
    figures(
        "refused distinct destinations", f"{count} in {took:.1f} s: {warnings} warning lines, RSS +{grew_mib:.1f} MiB"
    )
    assert warnings <= 2 * 20  # at most 20 lines a minute, whatever the flood
    assert grew_mib < 16
