"""Real clients (getent, curl, ssh) on a LAN whose resolver poisons a name, with the router sending the LAN's DNS to
`relay --dns`: the names resolve on the far side (the lab's unbound, DoH through squid), the connections are opened
by name, fake addresses outlive a relay restart, and a bypassed name keeps the LAN's answer and goes out directly.

The LAN's resolver is a dnsmasq on an extra address of the router, which the client's resolv.conf names; the router
redirects the LAN's port 53 to the relay's --dns (as `relay rules --dns` does), so the client is answered by the relay
whatever it asked. Asked from the router itself, where no redirect applies, dnsmasq still gives its own answers:
that is how each test shows the answer the client got is not the LAN's.
"""

import ipaddress
import time

import pytest

from relay.lab import ADDR, Lab, ssh_argv, start_dnsmasq, start_squid, start_sshd, start_unbound
from relay.lab.servers import HttpServer, serve_https
from relay.lab.services import intercept_dns
from tests.e2e.conftest import require_root

NAME = "mirror.clients.example"  # the LAN's resolver poisons it; the far side knows it as the server
# far's leg on the server network: no web server there, and far's own sshd there refuses the server's key.
POISONED = ADDR.far_server_side4
BYPASS_DOMAIN = "domestic.example"
LOCAL_NAME = f"git.{BYPASS_DOMAIN}"  # the LAN's resolver says far's sshd, which the router reaches directly
LAN_RESOLVER = "10.77.1.53"  # the client's resolv.conf names it; the router redirects it to the relay
SQUID = f"{ADDR.far4}:3128"
HELLO = "hello from the lab server"  # HttpServer's /hello
GREETING = "hello over ssh"
FAKE_RANGES = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00::/18")]
CLIENT_TIMEOUT = 20  # any one client command; ssh's own ConnectTimeout is 5 s, the resolver's 2 x 5 s
LOG_TIMEOUT = 10  # squid logs a CONNECT once its tunnel closed


@pytest.fixture(scope="module")
def lab():
    """A lab of this module's own: the resolv.conf and hosts files must be there before the daemons start."""
    require_root()
    with Lab() as lab:
        lab.set_resolver("client", LAN_RESOLVER)
        lab.set_hosts("far", {NAME: ADDR.server4})  # what squid resolves the name to
        lab.squid = start_squid(lab, listen=[(ADDR.far4, 3128)])
        # The far side's answer for LOCAL_NAME differs from the LAN's: a leak to it would show.
        far_data = {f"{NAME}.": [("A", ADDR.server4)], f"{LOCAL_NAME}.": [("A", ADDR.server4)]}
        lab.unbound = start_unbound(lab, data=far_data)
        lab.far_sshd = start_sshd(lab)
        lab.server_sshd = start_sshd(lab, host="server", name="sshd-server")
        lab.run("router", ["ip", "addr", "add", f"{LAN_RESOLVER}/24", "dev", ADDR.router_lan_if])
        lab.dnsmasq = start_dnsmasq(lab, {NAME: POISONED, LOCAL_NAME: ADDR.far4}, host="router", address=LAN_RESOLVER)
        HttpServer(lab, "server", "::", 80)
        lab.ca_file = serve_https(lab, NAME, ca_file="clients-ca.pem")
        yield lab


def start(lab, run_relay, *extra: str):
    """The relay with its DNS service, resolving through squid at the lab's unbound; the LAN's DNS redirected to it."""
    relay = run_relay(
        SQUID,
        "--dns",
        f"{ADDR.router_lan4}:53",
        "--dns-upstream",
        lab.unbound.doh_url,
        "--dns-ca",
        str(lab.unbound.ca_file),
        "--dns-local",
        f"udp://{LAN_RESOLVER}",
        *extra,
    )
    intercept_dns(lab)  # after run_relay: its interception starts from empty tables
    return relay


def start_fake_ip(lab, run_relay, state_dir: str):
    return start(lab, run_relay, "--dns-mode", "fake-ip", "--state-dir", state_dir)


def lan_answer(lab, name: str) -> list[str]:
    """What the LAN's resolver answers, asked from the router: no redirect there."""
    argv = ["dig", "+short", "+time=3", "+tries=1", f"@{LAN_RESOLVER}", name, "A"]
    return lab.run("router", argv, timeout=CLIENT_TIMEOUT).stdout.split()


def getent(lab, database: str, name: str) -> list[str]:
    """The addresses the client's own resolver library gives for ``name`` (``getent hosts``, ``ahostsv4``)."""
    result = lab.run("client", ["getent", database, name], check=False, timeout=CLIENT_TIMEOUT)
    return sorted({line.split()[0] for line in result.stdout.splitlines()})


def ssh(lab, sshd, destination: str) -> str:
    """Run ``echo GREETING`` over a real ssh login from the client; what it printed (or its error)."""
    argv = ssh_argv(sshd, destination=f"root@{destination}") + [f"echo {GREETING}"]
    result = lab.run("client", argv, check=False, timeout=CLIENT_TIMEOUT)
    return result.stdout.strip() or result.stderr.strip()


def curl(lab, url: str, *options: str) -> str:
    argv = ["curl", "-q", "--noproxy", "*", "-sS", "--max-time", "10", *options, url]
    result = lab.run("client", argv, check=False, timeout=CLIENT_TIMEOUT)
    return result.stdout.strip() or result.stderr.strip()


def connection_to(relay, port: int) -> dict[str, str]:
    """The relay's one connection line for a destination port (written once the connection closed)."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = [line for line in relay.connections() if line["dst"].endswith(f":{port}")]
        if lines or time.monotonic() > deadline:
            assert len(lines) == 1, relay.log_text()[-2000:]
            return lines[0]
        time.sleep(0.05)


def wait_for_squid(lab, method: str, url: str, before: int) -> None:
    """Squid logs (method, url) once more than ``before`` times, within LOG_TIMEOUT."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while squid_count(lab, method, url) <= before:
        assert time.monotonic() < deadline, lab.squid.access_log()[-10:]
        time.sleep(0.05)


def squid_count(lab, method: str, url: str) -> int:
    return sum((entry.method, entry.url) == (method, url) for entry in lab.squid.access_log())


def is_fake(address: str) -> bool:
    return any(ipaddress.ip_address(address) in network for network in FAKE_RANGES)


def test_getent_gets_the_far_sides_answer_not_the_lans(lab, run_relay):
    relay = start(lab, run_relay)
    assert lan_answer(lab, NAME) == [POISONED]
    assert getent(lab, "hosts", NAME) == [ADDR.server4]
    assert f"dns client={ADDR.client4} name={NAME}. type=A " in relay.log_text()  # -v: it went upstream
    assert f"{NAME}. A IN" in lab.unbound.log_text()


def test_curl_by_name_gets_the_servers_content_over_http_and_https(lab, run_relay):
    relay = start(lab, run_relay)
    gets, connects = squid_count(lab, "GET", f"http://{NAME}/hello"), squid_count(lab, "CONNECT", f"{NAME}:443")
    assert curl(lab, f"http://{NAME}/hello") == HELLO
    assert curl(lab, f"https://{NAME}/hello", "--cacert", lab.ca_file) == HELLO
    # To the address the far side gave, by the name the client sent.
    for port, name_from in ((80, "host"), (443, "sni")):
        line = connection_to(relay, port)
        assert (line["dst"], line.get("name"), line.get("name-from")) == (f"{ADDR.server4}:{port}", NAME, name_from)
    wait_for_squid(lab, "GET", f"http://{NAME}/hello", gets)
    wait_for_squid(lab, "CONNECT", f"{NAME}:443", connects)


@pytest.mark.parametrize("mode", ["real", "fake-ip"])
def test_ssh_to_a_poisoned_name_reaches_the_server_by_that_name(lab, run_relay, mode):
    """SSH never says a name: the relay gets it from its own DNS answer, or from the fake address."""
    if mode == "fake-ip":
        relay = start_fake_ip(lab, run_relay, str(lab.tmpdir / "fake-ip-ssh"))
    else:
        relay = start(lab, run_relay)
    assert lan_answer(lab, NAME) == [POISONED]
    connects = squid_count(lab, "CONNECT", f"{NAME}:22")
    assert ssh(lab, lab.server_sshd, NAME) == GREETING
    line = connection_to(relay, 22)
    assert (line.get("name"), line.get("name-from")) == (NAME, "dns" if mode == "real" else "fake-ip")
    address = line["dst"].rsplit(":", 1)[0].strip("[]")
    if mode == "real":
        assert address == ADDR.server4  # the far side's answer, not the LAN's
    else:
        assert is_fake(address)
    wait_for_squid(lab, "CONNECT", f"{NAME}:22", connects)


def test_a_fake_address_kept_across_a_relay_restart_still_reaches_the_server(lab, run_relay):
    relay = start_fake_ip(lab, run_relay, str(lab.tmpdir / "fake-ip-restart"))
    [fake] = getent(lab, "ahostsv4", NAME)
    assert is_fake(fake)
    relay.restart()  # the same arguments, so the same --state-dir
    assert "fake-ip: 1 names restored" in relay.log_text()
    connects = squid_count(lab, "CONNECT", f"{NAME}:22")
    assert ssh(lab, lab.server_sshd, fake) == GREETING  # by the address it kept: no new lookup
    line = connection_to(relay, 22)
    assert (line["dst"], line.get("name"), line.get("name-from")) == (f"{fake}:22", NAME, "fake-ip")
    wait_for_squid(lab, "CONNECT", f"{NAME}:22", connects)


def test_a_bypassed_name_gets_the_lans_answer_and_goes_out_directly(lab, run_relay):
    relay = start(lab, run_relay, "--bypass-domain", BYPASS_DOMAIN)
    far_log = len(lab.unbound.log_text())
    assert lan_answer(lab, LOCAL_NAME) == [ADDR.far4]
    by_router = f"query[A] {LOCAL_NAME} from {ADDR.router_lan4}"  # the relay's questions, not the client's
    asked = lab.dnsmasq.log_text().count(by_router)
    assert getent(lab, "hosts", LOCAL_NAME) == [ADDR.far4]  # the far side holds the server's address for it
    assert lab.dnsmasq.log_text().count(by_router) > asked
    assert ssh(lab, lab.far_sshd, LOCAL_NAME) == GREETING
    line = connection_to(relay, 22)
    assert (line["dst"], line.get("name"), line["via"]) == (f"{ADDR.far4}:22", LOCAL_NAME, "direct")
    assert LOCAL_NAME not in lab.unbound.log_text()[far_log:]
