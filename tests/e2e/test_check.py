"""`relay check` on the lab's router: healthy, then each thing broken in turn (rules removed or
shadowed, forwarding off, the upstream down, stock squid refusing port 22, the relay stopped, an
IPv6 address without IPv6 rules, DNS down), each with its line and exit status."""

import re
import sys

import pytest

from relay.lab import ADDR, start_dante, start_squid, start_sshd
from tests.e2e.conftest import DANTE_PASSWORD, DANTE_USER, RELAY_PORT, UPSTREAMS, ssh_args

SQUID_PORT = 3140  # a squid of this module's own, on far, that a test may stop
STOCK_SQUID_PORT = 3141  # Debian's squid.conf, on far's loopback: reached through --ssh
METRICS = "127.0.0.1:9414"
NO_UDP_DANTE_PORT = 1084  # a dante of this module's own that refuses UDP ASSOCIATE
UDP = ("--mode", "tproxy", "--udp", "on", "--upstream", UPSTREAMS["dante"])  # squid first, UDP through dante


@pytest.fixture(scope="module")
def squids(lab):
    own = start_squid(lab, listen=[(ADDR.far4, SQUID_PORT)], name="check-squid")
    stock = start_squid(lab, listen=[("127.0.0.1", STOCK_SQUID_PORT)], debian_default_conf=True, name="check-stock")
    yield own, stock
    own.stop()
    stock.stop()


def options(unbound, *extra, upstream=f"{ADDR.far4}:{SQUID_PORT}"):
    """One configuration for the relay, `relay rules` and `relay check` alike."""
    return [
        "--upstream",
        upstream,
        "--mark",
        "0x10",
        "--listen",
        f"0.0.0.0:{RELAY_PORT}",
        "--listen",
        f"[::]:{RELAY_PORT}",
        "--lan-iface",
        ADDR.router_lan_if,
        "--metrics",
        METRICS,
        "--dns",
        "0.0.0.0:53",
        "--dns",
        "[::]:53",
        "--dns-upstream",
        unbound.doh_url,
        "--dns-ca",
        str(unbound.ca_file),
        "--dns-local",
        f"udp://{unbound.direct_address}",
        *extra,
    ]


CHECK = ["--check-target", f"{ADDR.far_server_side4}:443", "--check-name", "far-only.example"]


def relay_command(lab, *args, check=True):
    return lab.run("router", [sys.executable, "-m", "relay", *args], check=check, timeout=90)


def check(lab, args, backend):
    """relay check's (exit status, {first words of each line: the line})."""
    result = relay_command(lab, "check", *args, *CHECK, "--backend", backend, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        level, what = re.match(r"(ok|warn|FAIL)\s+(.+?): ", line).groups()
        lines[what] = (level, line)
    print(result.stdout)
    return result.returncode, lines


@pytest.fixture
def router(lab, relays, unbound, squids):
    """A relay running with options(), its rules applied (backend chosen by the test), DNS answering."""
    applied = []

    def start(backend, *extra):
        relays.start(options(unbound, *extra))
        relay_command(lab, "rules", "--apply", "--backend", backend, *options(unbound, *extra))
        applied.append((backend, extra))

    yield start
    for backend, extra in applied:
        relay_command(lab, "rules", "--remove", "--backend", backend, *options(unbound, *extra))


def check_while_broken(lab, args, backend, restore):
    """check(), then ``restore()`` whatever happened."""
    try:
        return check(lab, args, backend)
    finally:
        restore()


def levels(lines):
    return {what: level for what, (level, _) in lines.items()}


@pytest.mark.parametrize("backend,mode", [("iptables", "redirect"), ("nft", "redirect"), ("nft", "tproxy")])
def test_a_healthy_router_is_all_ok(lab, router, unbound, backend, mode):
    router(backend, "--mode", mode)
    status, lines = check(lab, options(unbound, "--mode", mode), backend)
    assert status == 0
    assert set(levels(lines).values()) == {"ok"}, lines
    upstream = f"upstream http://{ADDR.far4}:{SQUID_PORT}"
    assert re.search(r"opened a tunnel to 10\.77\.3\.1:443 in \d+ ms", lines[upstream][1])
    assert "not refused" in lines[f"{upstream} CONNECT to other ports"][1]
    assert re.search(rf"far-only\.example is {ADDR.server4}, answered in \d+ ms", lines["DNS 127.0.0.1:53"][1])
    assert f"rules ({backend})" in lines and "relay running" in lines and f"metrics {METRICS}" in lines
    assert "rejected by relay's rules (--udp-reject quic)" in lines["QUIC (UDP 443) from the LAN"][1]


def test_rules_removed_or_shadowed(lab, router, unbound):
    router("iptables")
    relay_command(lab, "rules", "--remove", "--backend", "iptables", *options(unbound))
    status, lines = check(lab, options(unbound), "iptables")
    assert status == 1 and lines["rules (iptables)"][0] == "FAIL"
    assert "not installed: run 'relay rules --apply --backend iptables'" in lines["rules (iptables)"][1]
    level, line = lines["QUIC (UDP 443) from the LAN"]
    assert level == "warn" and "relay's rules reject it (--udp-reject quic), but they are not as expected" in line

    relay_command(lab, "rules", "--apply", "--backend", "iptables", *options(unbound))
    accept = ["-t", "nat", "-I", "PREROUTING", "-i", ADDR.router_lan_if, "-p", "tcp", "-j", "ACCEPT"]
    lab.run("router", ["iptables", "-w", "5", *accept])
    status, lines = check_while_broken(
        lab,
        options(unbound),
        "iptables",
        lambda: lab.run("router", ["iptables", "-w", "5", "-t", "nat", "-D", *accept[3:]]),
    )
    assert status == 1
    level, line = lines["iptables nat PREROUTING order"]
    assert level == "FAIL" and f"'-A PREROUTING -i {ADDR.router_lan_if} -p tcp -j ACCEPT' comes before" in line
    assert levels(lines)["rules (iptables)"] == "ok"  # our own chains are intact: only the order is wrong


def test_an_accept_inside_our_nft_table(lab, router, unbound):
    router("nft")
    lab.run("router", ["nft", "insert", "rule", "inet", "relay", "prerouting", "meta", "l4proto", "tcp", "accept"])
    status, lines = check(lab, options(unbound), "nft")
    assert status == 1
    level, line = lines["rules (nft)"]
    assert level == "FAIL" and "extra: meta l4proto tcp accept" in line


def test_tproxy_routing_removed(lab, router, unbound):
    router("iptables", "--mode", "tproxy")
    lab.run("router", ["ip", "-6", "rule", "del", "fwmark", "0x100/0x100", "lookup", "100"])
    status, lines = check(lab, options(unbound, "--mode", "tproxy"), "iptables")
    assert status == 1
    level, line = lines["TPROXY routing"]
    assert level == "FAIL"
    assert line.endswith(
        "not delivered to the relay: ip -6 rule add fwmark 0x100/0x100 lookup 100 "
        "(or 'relay rules --apply' with this config)"
    )
    assert levels(lines)["iptables mangle PREROUTING order"] == "ok"


def test_forwarding_off(lab, router, unbound):
    router("iptables")
    lab.run("router", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
    status, lines = check_while_broken(
        lab,
        options(unbound),
        "iptables",
        lambda: lab.run("router", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]),
    )
    assert status == 1
    assert (
        lines["net.ipv4.ip_forward"][0] == "FAIL"
        and "sysctl -w net.ipv4.ip_forward=1" in lines["net.ipv4.ip_forward"][1]
    )
    assert lines["net.ipv6.conf.all.forwarding"][0] == "FAIL"  # the LAN has IPv6, and it is intercepted


def test_upstream_down(lab, router, unbound, squids):
    router("iptables")
    own, _ = squids
    own.stop()
    status, lines = check_while_broken(lab, options(unbound), "iptables", own.start)
    assert status == 1
    level, line = lines[f"upstream http://{ADDR.far4}:{SQUID_PORT}"]
    assert level == "FAIL" and "connect-econnrefused" in line


def test_stock_squid_refusing_port_22_through_ssh(lab, unbound, squids):
    ssh = ssh_args(lab)
    status, lines = check(lab, options(unbound, *ssh, upstream=f"127.0.0.1:{STOCK_SQUID_PORT}"), "iptables")
    assert status == 1  # no relay runs with this configuration
    assert re.search(
        r"ok\s+ssh tunnel: -L 127\.0\.0\.1:\d+ via root@10\.77\.2\.2 to 127\.0\.0\.1:3141 up", lines["ssh tunnel"][1]
    )
    upstream = f"upstream http://127.0.0.1:{STOCK_SQUID_PORT}"
    assert levels(lines)[upstream] == "ok"
    level, line = lines[f"{upstream} CONNECT to other ports"]
    assert level == "warn" and "add 'acl Safe_ports port 22' and 'acl SSL_ports port 22' to squid.conf" in line

    broken = [*ssh[:3], "/nonexistent-key", *ssh[4:]]
    status, lines = check(lab, options(unbound, *broken, upstream=f"127.0.0.1:{STOCK_SQUID_PORT}"), "iptables")
    assert status == 1 and lines["ssh tunnel"][0] == "FAIL"
    assert "did not come up: ssh exited with status 255" in lines["ssh tunnel"][1]


def test_an_sshd_allowing_no_session_is_a_warning(lab, unbound, squids):
    """MaxSessions 0: the first ssh, asking for a session, is refused; the next, without one, comes up."""
    sshd = start_sshd(lab, port=2223, name="check-sshd-no-sessions", settings=("MaxSessions 0",))
    try:
        ssh = [*ssh_args(lab), "--ssh-session", "auto"]
        ssh[1], ssh[3] = f"root@{sshd.address}:{sshd.port}", str(sshd.client_key)
        status, lines = check(lab, options(unbound, *ssh, upstream=f"127.0.0.1:{STOCK_SQUID_PORT}"), "iptables")
    finally:
        sshd.stop()
    level, line = lines["ssh tunnel"]
    assert level == "warn" and " up in " in line and "without a session" in line, line
    assert levels(lines)[f"upstream http://127.0.0.1:{STOCK_SQUID_PORT}"] == "ok"


def test_relay_not_running(lab, router, unbound, relays):
    router("iptables")
    for relay in relays.started:
        relay.stop()
    status, lines = check(lab, options(unbound), "iptables")
    assert status == 1
    assert lines["relay running"][0] == "FAIL" and f"nothing listens on port {RELAY_PORT}" in lines["relay running"][1]
    assert lines[f"metrics {METRICS}"][0] == "FAIL"


def test_ipv6_address_without_ipv6_rules(lab, router, unbound):
    router("iptables")
    jump = ["-t", "nat", "-D", "PREROUTING", "-i", ADDR.router_lan_if, "-p", "tcp", "!", "--dport", "53", "-j", "RELAY"]
    lab.run("router", ["ip6tables", "-w", "5", *jump])
    status, lines = check(lab, options(unbound), "iptables")
    assert status == 1  # the rules are not what `relay rules` installs either
    level, line = lines["IPv6 on the LAN"]
    assert level == "warn" and f"{ADDR.router_lan6} on {ADDR.router_lan_if} but no IPv6 interception" in line


def test_dns_down(lab, router, unbound):
    router("iptables")
    unbound.stop()
    status, lines = check_while_broken(lab, options(unbound), "iptables", unbound.start)
    assert status == 1
    level, line = lines["DNS 127.0.0.1:53"]
    assert level == "FAIL" and "far-only.example: SERVFAIL" in line


def test_udp_through_dante(lab, router, unbound):
    """--udp on: a DNS query to far's unbound through dante's UDP ASSOCIATE, answered; to a port where nothing
    answers, and through a dante that refuses UDP ASSOCIATE, a FAIL that says which."""
    router("nft", *UDP)
    what = f"upstream {UPSTREAMS['dante']} UDP"
    dns_server = f"{ADDR.far_server_side4}:53"
    status, lines = check(lab, [*options(unbound, *UDP), "--check-udp-target", dns_server], "nft")
    assert status == 0 and set(levels(lines).values()) == {"ok"}, lines
    assert f"taken by the relay (--udp) through {UPSTREAMS['dante']}" in lines["QUIC (UDP 443) from the LAN"][1]
    assert re.search(
        rf"a DNS query to {re.escape(dns_server)} answered NOERROR in \d+ ms \(relay address", lines[what][1]
    )

    silent = f"{ADDR.far_server_side4}:5399"
    status, lines = check(lab, [*options(unbound, *UDP), "--check-udp-target", silent], "nft")
    assert status == 1 and lines[what][0] == "FAIL"
    assert f"associated (relay address {ADDR.far4}:" in lines[what][1]
    assert f"but no answer from {silent} came back" in lines[what][1]
    # dante closes the relay port when the target's port unreachable comes: the query's next copy meets that
    assert "(got a port unreachable from the relay address)" in lines[what][1]
    assert {level for other, level in levels(lines).items() if other != what} == {"ok"}

    dante = start_dante(lab, listen=[(ADDR.far4, NO_UDP_DANTE_PORT)], deny_udp=True, name="check-dante-no-udp")
    try:
        refusing = f"socks5://{ADDR.far4}:{NO_UDP_DANTE_PORT}"
        udp_through_it = [*UDP[:-1], refusing]
        status, lines = check(lab, [*options(unbound, *udp_through_it), "--check-udp-target", dns_server], "nft")
    finally:
        dante.stop()
    level, line = lines[f"upstream {refusing} UDP"]
    assert status == 1 and level == "FAIL" and "the proxy refused UDP ASSOCIATE (" in line


def test_no_password_in_the_output(lab, unbound):
    upstream = UPSTREAMS["dante-auth"]
    udp = ("--mode", "tproxy", "--udp", "on", "--check-udp-target", f"{ADDR.far_server_side4}:53")
    result = relay_command(lab, "check", *options(unbound, *udp, upstream=upstream), *CHECK, check=False)
    assert re.search(
        rf"ok\s+upstream socks5://{DANTE_USER}:\*\*\*@{ADDR.far4}:1082: opened a tunnel to 10\.77\.3\.1:443",
        result.stdout,
    ), result.stdout
    assert f"upstream socks5://{DANTE_USER}:***@{ADDR.far4}:1082 UDP" in result.stdout
    assert DANTE_PASSWORD not in result.stdout + result.stderr
