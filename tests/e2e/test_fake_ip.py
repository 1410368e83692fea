"""`relay --dns --dns-mode fake-ip` in the lab: dig on the client gets fake addresses with TTL 1, excluded names
their real ones from the lab's unbound on far, and a relay restarted with the same --state-dir gives each name the
address it had."""

import re
import socket
import stat
import sys

import pytest

from relay.dns.fakeip import STORE_HEADER
from relay.dns.fakeip_store import STORE_NAME
from relay.lab import ADDR
from relay.rules import BACKENDS
from tests.e2e.clients import connect_expecting_reset
from tests.e2e.conftest import RELAY_PORT, UPSTREAMS
from tests.e2e.test_dns_service import DNS, metric, start


def dig_records(lab, *args: str) -> tuple[str, list[tuple[int, str]]]:
    """(status, [(TTL, data)] of the answer section) of ``dig @router args`` from the client."""
    out = lab.run(
        "client", ["dig", f"@{ADDR.router_lan4}", "+time=4", "+tries=1", "+nocookie", *args], check=False
    ).stdout
    status = re.search(r"status: ([A-Z]+)", out)
    answers = re.search(r";; ANSWER SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    records = [(int(line.split()[1]), line.split()[-1]) for line in answers.group(1).splitlines()] if answers else []
    return (status.group(1) if status else f"no reply: {out.strip()[-200:]}"), records


def start_fake_ip(relays, unbound, state_dir, *extra: str):
    return start(
        relays,
        UPSTREAMS["dante"],
        "--dns-upstream",
        f"tcp://{unbound.address}:53",
        "--dns-mode",
        "fake-ip",
        "--state-dir",
        str(state_dir),
        *extra,
    )


def test_fake_addresses_with_ttl_1_survive_a_restart(lab, relays, unbound):
    state_dir = lab.tmpdir / "fake-ip-restart"
    relay = start_fake_ip(relays, unbound, state_dir, "--fake-ip-exclude", "server.example")
    assert dig_records(lab, "far-only.example", "A") == ("NOERROR", [(1, "198.18.0.1")])
    assert dig_records(lab, "+tcp", "far-only.example", "AAAA") == ("NOERROR", [(1, "fc00::1")])
    assert dig_records(lab, "far-only.example", "HTTPS") == ("NOERROR", [])
    excluded_status, excluded = dig_records(lab, "server.example", "A")  # real, from unbound through dante
    assert excluded_status == "NOERROR" and [data for _, data in excluded] == [ADDR.server4]
    assert metric(lab, "relay_dns_fake_ips_in_use", family="ipv4") == 1
    assert metric(lab, "relay_dns_queries_total", type="A", outcome="fake-ip") == 1
    assert metric(lab, "relay_dns_queries_total", type="A", outcome="upstream") == 1

    relay.restart()  # SIGTERM: the store is written on the way out
    store = state_dir / STORE_NAME
    assert store.read_bytes().startswith(STORE_HEADER) and stat.S_IMODE(store.stat().st_mode) == 0o600
    assert "fake-ip: 2 names restored" in relay.log_text()
    assert dig_records(lab, "new.example", "A") == ("NOERROR", [(1, "198.18.0.2")])  # the next free one
    assert dig_records(lab, "far-only.example", "A") == ("NOERROR", [(1, "198.18.0.1")])
    assert dig_records(lab, "+tcp", "far-only.example", "AAAA") == ("NOERROR", [(1, "fc00::1")])


def test_a_damaged_store_is_rebuilt_empty_with_a_warning(lab, relays, unbound):
    state_dir = lab.tmpdir / "fake-ip-damaged"
    state_dir.mkdir(mode=0o700)
    (state_dir / STORE_NAME).write_bytes(STORE_HEADER + b"\x78\x9c not what was written")
    relay = start_fake_ip(relays, unbound, state_dir)
    assert f"fake-ip store {state_dir}/{STORE_NAME} is damaged" in relay.log_text()
    assert dig_records(lab, "far-only.example", "A") == ("NOERROR", [(1, "198.18.0.1")])
    relay.restart()
    assert "fake-ip: 1 names restored" in relay.log_text()
    assert dig_records(lab, "far-only.example", "A") == ("NOERROR", [(1, "198.18.0.1")])


@pytest.mark.parametrize("backend", BACKENDS)
def test_relay_rules_send_tcp_to_fake_addresses_to_the_relay_and_reject_udp(lab, relays, unbound, backend):
    """With the rules `relay rules --dns-mode fake-ip` installs, TCP to a fake address reaches the relay (though the
    fake ranges are reserved, fc00::/18 inside the exempt fc00::/7), and UDP to one is refused at once."""
    options = ["--upstream", UPSTREAMS["dante"], "--mark", "0x1", "--listen", f"0.0.0.0:{RELAY_PORT}"]
    options += ["--listen", f"[::]:{RELAY_PORT}", "--dns", DNS]
    options += [
        "--dns-mode",
        "fake-ip",
        "--state-dir",
        str(lab.tmpdir / f"fake-ip-rules-{backend}"),
        "--dns-upstream",
        f"tcp://{unbound.address}:53",
    ]
    relay = relays.start(options)
    rules = [sys.executable, "-m", "relay", "rules", *options, "--lan-iface", ADDR.router_lan_if, "--backend", backend]
    rules += ["--dns", f"[{ADDR.router_lan6}]:53"]  # relay rules wants a DNS address in each family
    # A real router has a default route, so UDP to a fake address would be forwarded; here the router has none.
    routes = [
        ["ip", "route", "add", "198.18.0.0/15", "via", ADDR.far4],
        ["ip", "-6", "route", "add", "fc00::/18", "via", ADDR.far6],
    ]
    for route in routes:
        lab.run("router", route)
    lab.run("router", [*rules, "--apply"])
    try:
        for address, family in (("198.18.0.1", socket.AF_INET), ("fc00::1", socket.AF_INET6)):
            connect_expecting_reset(lab, "client", address, 7000, within=5)  # no name for that address
            udp = lab.socket("client", family, socket.SOCK_DGRAM)
            udp.settimeout(5)
            udp.connect((address, 443))
            udp.send(b"QUIC would start here")
            with pytest.raises(ConnectionRefusedError):
                udp.recv(100)
            udp.close()
        dsts = [line["dst"] for line in relay.connections(at_least=2)]
        assert sorted(dsts) == ["198.18.0.1:7000", "[fc00::1]:7000"], relay.log_text()[-2000:]
    finally:
        lab.run("router", [*rules, "--remove"])
        for route in routes:
            lab.run("router", [part if part != "add" else "del" for part in route])
