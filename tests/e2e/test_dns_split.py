"""Split resolution against real resolvers that disagree: the session's unbound on far (reached only through the
proxy; it holds relay.lab.services.LAB_DNS_DATA) and dnsmasq on the client's LAN, each with its own answer for the
same names. make_resolvers is built from the settings, its local resolver read from a resolv.conf naming dnsmasq,
as the router's own would, and asked from the router's namespace."""

import dns.rdatatype
import pytest

from relay.lab import ADDR, start_dnsmasq
from tests.dnsresolve.servers import split_resolvers_for
from tests.e2e.conftest import UPSTREAMS
from tests.e2e.test_dns_resolvers import in_router, records

A, PTR = dns.rdatatype.A, dns.rdatatype.PTR
TIMEOUT = 2.0
DOMESTIC_LAN_ADDRESS = "10.77.1.80"  # what the LAN's resolver says of the domestic CDN's name
POISONED_ADDRESS = "10.77.1.81"  # what it says of a name only the far side answers right
PRINTER_ADDRESS = "10.77.1.90"


@pytest.fixture(scope="module")
def dnsmasq(lab):
    records = {
        "cdn.domestic.example": DOMESTIC_LAN_ADDRESS,
        "far-only.example": POISONED_ADDRESS,
        "printer.lan": PRINTER_ADDRESS,
    }
    server = start_dnsmasq(lab, records, name="dnsmasq-split")
    yield server
    server.stop()


@pytest.mark.parametrize("proxy", ["squid-via-ssh-L", "dante"])
def test_local_names_and_private_ptr_get_the_lans_answers_and_the_rest_the_far_sides(
    lab, unbound, dnsmasq, proxy, tmp_path
):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"search lan\nnameserver {dnsmasq.address}\n")
    values = {
        "upstream": UPSTREAMS[proxy],
        "dns-upstream": [unbound.doh_url],
        "dns-ca": str(unbound.ca_file),
        "bypass-domain": ["domestic.example"],
    }
    questions = [
        ("cdn.domestic.example.", A, 1),
        ("far-only.example.", A, 1),
        ("80.1.77.10.in-addr.arpa.", PTR, 1),
        ("printer.lan.", A, 1),
        ("nx.example.", A, 1),
    ]
    local_before, far_before = len(dnsmasq.asked()), len(unbound.log_text())

    async def scenario():
        async with split_resolvers_for(values, str(resolv_conf)) as resolvers:
            return [records(await resolvers.resolve(key, TIMEOUT)) for key in questions]

    assert in_router(lab, scenario) == [
        ("NOERROR", [DOMESTIC_LAN_ADDRESS]),  # unbound holds ADDR.server4 for it (LAB_DNS_DATA)
        ("NOERROR", [ADDR.server4]),  # dnsmasq holds POISONED_ADDRESS for it
        ("NOERROR", ["cdn.domestic.example."]),
        ("NOERROR", [PRINTER_ADDRESS]),
        ("NXDOMAIN", []),  # unbound's, not dnsmasq's REFUSED
    ]
    # Neither side heard of the other's questions.
    assert dnsmasq.asked()[local_before:] == ["cdn.domestic.example", "80.1.77.10.in-addr.arpa", "printer.lan"]
    far_log = unbound.log_text()[far_before:]
    assert "far-only.example. A IN" in far_log and "nx.example. A IN" in far_log
    assert not any(name in far_log for name in ["domestic", "in-addr.arpa", "printer"])
