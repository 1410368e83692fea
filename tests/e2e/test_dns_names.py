"""A name from the relay's own DNS service opens a server-speaks-first connection by name, at once.

The client asks the relay's DNS (`dig`), which resolves through the tunnel at the lab's unbound; unbound's answer
is an address the far side cannot use (as a CDN node for another region would be), while the proxies on far
resolve the name to the server. The client connects to the answered address and waits for the banner of a server
that speaks first: only a connection opened by the name gets it, and with a --sniff-timeout of a minute only one
opened without waiting for the client's bytes gets it in time.
"""

import time

import pytest

from relay.lab import ADDR, Lab, start_dante, start_squid, start_unbound
from relay.lab.servers import BannerServer
from tests.e2e.clients import connect
from tests.e2e.conftest import BANNER_PORT, require_root

try:
    import relay.dns.service  # noqa: F401  (the DNS service: this test needs `relay --dns`)
except ImportError:
    pytest.skip("needs relay.dns.service", allow_module_level=True)

NAME = "banner.example"
POISONED = ADDR.far_server_side4  # nothing listens on BANNER_PORT there: by address, the proxy is refused
DNS_PORT = 53  # on the router's LAN address; UDP (the lab intercepts all of the client's TCP)
# (upstream, options): squid in forward mode would wait for the client's bytes (README, DNS).
PROXIES = {
    "squid": (f"{ADDR.far4}:3128", ["--http-mode", "connect"]),
    "dante": (f"socks5://{ADDR.far4}:1080", []),
}


@pytest.fixture(scope="module")
def lab():
    """A lab of this module's own (the proxies must know the name from the start), for conftest's run_relay."""
    require_root()
    with Lab() as lab:
        lab.set_hosts("far", {NAME: ADDR.server4})  # what the proxies resolve the name to
        lab.squid = start_squid(lab, listen=[(ADDR.far4, 3128)])
        start_dante(lab)
        lab.unbound = start_unbound(lab, data={f"{NAME}.": [("A", POISONED)]})
        BannerServer(lab, "server", "::", BANNER_PORT)
        yield lab


def dig(lab, name: str) -> list[str]:
    result = lab.run("client", ["dig", "+short", "+time=5", "-p", str(DNS_PORT), f"@{ADDR.router_lan4}", name, "A"])
    return result.stdout.split()


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_server_speaking_first_is_reached_by_the_name_the_relays_dns_answered(run_relay, lab, proxy):
    upstream, extra = PROXIES[proxy]
    relay = run_relay(
        upstream,
        *extra,
        "--dns",
        f"{ADDR.router_lan4}:{DNS_PORT}",
        "--dns-upstream",
        f"tcp://{lab.unbound.address}:53",
        "--sniff-timeout",
        "60",
    )
    assert dig(lab, NAME) == [POISONED]
    with connect(lab, POISONED, BANNER_PORT, timeout=10) as client:
        assert client.recv(100) == BannerServer.banner  # the client never sent a byte
    [line] = relay.connections(at_least=1)
    assert (line["dst"], line["name"], line["name-from"]) == (f"{POISONED}:{BANNER_PORT}", NAME, "dns")
    if proxy == "squid":  # squid logs a CONNECT once its tunnel closed
        deadline = time.monotonic() + 5
        while f"{NAME}:{BANNER_PORT}" not in lab.squid.connect_targets():
            assert time.monotonic() < deadline, lab.squid.access_log()
            time.sleep(0.05)
