"""`relay --dns`: dig on the LAN asks the router, which resolves on the far side (DoH through squid
via ssh -L, or DNS over TCP through dante) at the lab's unbound, which only the proxies can reach."""

import math
import re
import sys
import time

import pytest

from relay.lab import ADDR, start_ssh_tunnel
from tests.e2e.conftest import UPSTREAMS

DNS = f"{ADDR.router_lan4}:53"
METRICS_PORT = 9253


def dig(lab, *args: str, server: str = ADDR.router_lan4) -> tuple[str, list[str]]:
    """(status, answer records' data) of ``dig @server args`` from the client."""
    out = lab.run("client", ["dig", f"@{server}", "+time=4", "+tries=1", "+nocookie", *args], check=False).stdout
    status = re.search(r"status: ([A-Z]+)", out)
    answers = re.search(r";; ANSWER SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    data = [line.split()[-1] for line in answers.group(1).splitlines()] if answers else []
    return (status.group(1) if status else f"no reply: {out.strip()[-200:]}"), sorted(data)


def metric(lab, name: str, **labels: str) -> float:
    """A labelled sample's value from the relay's metrics; 0 when absent."""
    text = lab.run("router", ["curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    found = re.search(rf"^{name}{{{wanted}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def start(relays, upstream: str, *extra: str):
    return relays.start(["--upstream", upstream, "--dns", DNS, "--metrics", f"127.0.0.1:{METRICS_PORT}", *extra])


@pytest.mark.parametrize(
    "proxy,scheme", [("squid-via-ssh-L", "https"), ("dante", "https"), ("dante", "tcp")], ids=lambda v: v
)
def test_dig_over_udp_and_tcp_gets_the_far_sides_answers(lab, relays, unbound, proxy, scheme):
    dns_upstream = unbound.doh_url if scheme == "https" else f"tcp://{unbound.address}:53"
    relay = start(relays, UPSTREAMS[proxy], "--dns-upstream", dns_upstream, "--dns-ca", str(unbound.ca_file))
    assert dig(lab, "far-only.example", "A") == ("NOERROR", [ADDR.server4])
    assert dig(lab, "+tcp", "far-only.example", "AAAA") == ("NOERROR", [ADDR.server6])
    assert dig(lab, "+tcp", "nowhere.example", "A") == ("NXDOMAIN", [])
    assert dig(lab, "far-only.example", "A") == ("NOERROR", [ADDR.server4])  # from the cache
    assert metric(lab, "relay_dns_queries_total", type="A", outcome="cache") == 1
    assert metric(lab, "relay_dns_queries_total", type="A", outcome="upstream") == 2
    upstream_lines = [line for line in relay.log_text().splitlines() if " dns client=" in line]
    assert len(upstream_lines) == 3, relay.log_text()[-2000:]  # -v: one per question that went upstream


def start_doh_via_dante(relays, unbound, *extra: str):
    return start(
        relays, UPSTREAMS["dante"], "--dns-upstream", unbound.doh_url, "--dns-ca", str(unbound.ca_file), *extra
    )


def test_a_client_outside_dns_allow_is_refused(lab, relays, unbound):
    relay = start_doh_via_dante(relays, unbound, "--dns-allow", "10.77.9.0/24")
    assert dig(lab, "far-only.example", "A") == ("REFUSED", [])
    assert dig(lab, "+tcp", "far-only.example", "A") == ("REFUSED", [])
    assert " dns client=" not in relay.log_text()  # nothing went upstream


def test_by_default_only_the_lan_interfaces_network_is_answered(lab, relays, unbound):
    """With --lan-iface and no --dns-allow, the far side (a private range too) is refused on the WAN address."""
    start_doh_via_dante(relays, unbound, "--dns", f"{ADDR.router_wan4}:53", "--lan-iface", ADDR.router_lan_if)
    assert dig(lab, "far-only.example", "A") == ("NOERROR", [ADDR.server4])
    wan = lab.run("far", ["dig", f"@{ADDR.router_wan4}", "+time=4", "+tries=1", "far-only.example", "A"], check=False)
    assert "status: REFUSED" in wan.stdout, wan.stdout


def test_a_dns_upstream_the_proxy_refuses_is_servfail_at_once(lab, relays, unbound, figures):
    """squid (stock rules: CONNECT to 443 only) refuses a DoH server on another port: SERVFAIL, quickly."""
    start(
        relays,
        UPSTREAMS["squid-via-ssh-L"],
        "--dns-upstream",
        f"https://{unbound.address}:8443/dns-query",
        "--dns-timeout",
        "2",
    )
    started = time.monotonic()
    assert dig(lab, "far-only.example", "A") == ("SERVFAIL", [])
    figures("SERVFAIL with the DoH server out of squid's reach", f"{time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < 2 + 1 + 1  # --dns-timeout, the service's grace, dig's own start


def test_a_dns_port_taken_is_a_clear_error(lab):
    lab.spawn("router", [sys.executable, "-c", HOLD_UDP_53], name="udp53-holder")
    deadline = time.monotonic() + 10
    while f"{DNS} " not in lab.run("router", ["ss", "-Hlun"]).stdout:
        assert time.monotonic() < deadline, "the holder never bound port 53"
        time.sleep(0.05)
    argv = [
        sys.executable,
        "-m",
        "relay",
        "--upstream",
        UPSTREAMS["dante"],
        "--dns",
        DNS,
        "--listen",
        "127.0.0.1:12399",
    ]
    result = lab.run("router", argv, check=False, timeout=20)
    lab.stop("udp53-holder")
    assert result.returncode == 2, result
    assert f"cannot serve DNS on {DNS} (UDP): Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


HOLD_UDP_53 = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{ADDR.router_lan4}", 53))
time.sleep(60)
"""


QUERY_LOOP = """
import sys, time
import dns.message, dns.query, dns.rcode
server, seconds = sys.argv[1], float(sys.argv[2])
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    i += 1
    asked = time.time()  # wall clock: the test compares it with when it killed the proxy
    try:
        reply = dns.query.udp(dns.message.make_query(f"nx-{i}.example.", "A"), server, timeout=3)
        outcome = dns.rcode.to_text(reply.rcode())
    except dns.exception.Timeout:
        outcome = "TIMEOUT"
    print(f"{asked:.3f} {outcome}", flush=True)
    time.sleep(0.01)
"""


def test_the_first_proxy_killed_under_queries_fails_over_within_a_few_queries(lab, relays, unbound, figures):
    """A stream of questions that all miss the cache, DoH through an ssh -D tunnel that is killed, with
    dante as the second upstream: the HTTP/2 connection is reopened through dante."""
    victim = start_ssh_tunnel(lab, lab.sshd, forwards=("-D", "127.0.0.1:1096"), name="ssh-D-dns-victim")
    start(
        relays,
        "socks5://127.0.0.1:1096",
        "--upstream",
        UPSTREAMS["dante"],
        "--dns-upstream",
        unbound.doh_url,
        "--dns-ca",
        str(unbound.ca_file),
    )
    assert dig(lab, "far-only.example", "A") == ("NOERROR", [ADDR.server4])  # the connection is open
    lab.spawn("client", [sys.executable, "-c", QUERY_LOOP, ADDR.router_lan4, "4"], name="dns-query-loop")
    time.sleep(1.5)
    killed = time.time()
    victim.kill()
    lab.process("dns-query-loop").wait(timeout=30)
    outcomes = [line.split() for line in lab.log_text("dns-query-loop").splitlines() if line[:1].isdigit()]
    after = [(float(at), outcome) for at, outcome in outcomes if float(at) >= killed]
    failed = [outcome for _, outcome in after if outcome != "NXDOMAIN"]
    recovered = next((at for at, outcome in after if outcome == "NXDOMAIN"), math.inf) - killed
    figures(
        "ssh -D killed under a stream of DoH questions",
        f"{len(failed)} of {len(after)} failed, answered again after {recovered:.2f} s",
    )
    assert len(outcomes) > 50 and len(after) > 20, lab.log_text("dns-query-loop")[-1000:]
    assert all(outcome == "NXDOMAIN" for _, outcome in after[-10:])
    assert len(failed) <= 3, after[:10]
    # the DoH connection was opened again, through dante, after the dead tunnel refused it
    assert metric(lab, "relay_upstream_attempts_failed_total", upstream="socks5://127.0.0.1:1096", fault="proxy") >= 1
