"""Which resolver a question goes to: names under the local and bypass suffixes and the reverse names of the
LAN's kinds of addresses go local, everything else far."""

import ipaddress

import dns.name
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.dns.split import LOCAL_NETWORKS, goes_local, parsed_goes_local, reverse_network

PTR, A, SOA = dns.rdatatype.PTR, dns.rdatatype.A, dns.rdatatype.SOA
LOCAL_SUFFIXES = ["lan", "home.arpa"]
BYPASS_SUFFIXES = ["cdn.example"]

addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
)


def local(name: str, rdtype: int = A) -> bool:
    return goes_local((name, rdtype, 1), LOCAL_SUFFIXES, BYPASS_SUFFIXES)


def ptr_name(address) -> str:
    """The reverse name, by the standard library: an oracle apart from relay.dns.split."""
    return address.reverse_pointer + "."


def is_local_address(address) -> bool:
    return any(address in network for network in LOCAL_NETWORKS)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("printer.lan.", True),
        ("lan.", True),
        ("a.b.c.lan.", True),
        ("router.home.arpa.", True),
        ("home.arpa.", True),
        ("img.cdn.example.", True),
        ("cdn.example.", True),
        ("xlan.", False),  # a suffix is whole labels
        ("lan.example.", False),
        ("notcdn.example.", False),
        ("cdn.example.com.", False),
        ("example.", False),
        ("arpa.", False),
        (".", False),
        ("www.example.com.", False),
        ("evil\\.lan.", False),  # one label "evil.lan", a TLD of its own
    ],
)
def test_names_under_a_local_or_bypass_suffix_go_local_and_no_other(name, expected):
    assert local(name) is expected
    assert local(name, PTR) is expected


def test_with_no_suffixes_only_local_reverse_names_go_local():
    assert not goes_local(("printer.lan.", A, 1), [], [])
    assert goes_local(("1.1.168.192.in-addr.arpa.", PTR, 1), [], [])


@pytest.mark.parametrize(
    "address,expected",
    [
        ("9.255.255.255", False), ("10.0.0.0", True), ("10.255.255.255", True), ("11.0.0.0", False),
        ("172.15.255.255", False), ("172.16.0.0", True), ("172.31.255.255", True), ("172.32.0.0", False),
        ("192.167.255.255", False), ("192.168.0.0", True), ("192.168.255.255", True), ("192.169.0.0", False),
        ("100.63.255.255", False), ("100.64.0.0", True), ("100.127.255.255", True), ("100.128.0.0", False),
        ("126.255.255.255", False), ("127.0.0.1", True), ("127.255.255.255", True), ("128.0.0.0", False),
        ("169.253.255.255", False), ("169.254.0.1", True), ("169.254.255.255", True), ("169.255.0.0", False),
        ("8.8.8.8", False), ("1.1.1.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
        ("fbff:ffff::1", False), ("fc00::", True), ("fd12:3456::1", True), ("fdff:ffff::ffff", True),
        ("fe00::", False), ("fe7f:ffff::", False), ("fe80::1", True), ("febf:ffff::1", True), ("fec0::", False),
        ("::1", True), ("::", False), ("::2", False), ("2001:db8::1", False), ("2606:4700::1111", False),
        ("::ffff:10.0.0.1", False),  # a mapped address's reverse name is in ip6.arpa's ::ffff:0:0/96, not 10/8
    ],
)  # fmt: skip
def test_ptr_of_each_local_range_goes_local_up_to_its_edges(address, expected):
    assert local(ptr_name(ipaddress.ip_address(address)), PTR) is expected


@given(addresses)
def test_a_reverse_name_stands_for_its_address_alone(address):
    network = reverse_network(dns.name.from_text(ptr_name(address)))
    assert network == ipaddress.ip_network(address)


@given(addresses)
def test_a_ptr_question_goes_local_exactly_for_local_addresses(address):
    assert local(ptr_name(address), PTR) is is_local_address(address)
    assert local(ptr_name(address).upper(), PTR) is is_local_address(address)  # names are case-blind


@given(addresses, st.data())
def test_a_reverse_zone_goes_local_exactly_when_its_whole_network_is_local(address, data):
    """``168.192.in-addr.arpa.`` asks about 192.168.0.0/16: local; ``192.in-addr.arpa.`` about 192.0.0.0/8: far."""
    labels = ptr_name(address).split(".")[:-1]  # the address's labels, then in-addr/ip6, arpa
    kept = data.draw(st.integers(0, len(labels) - 2))
    zone = ".".join(labels[len(labels) - 2 - kept :]) + "."
    bits = 8 if address.version == 4 else 4
    network = ipaddress.ip_network(f"{address}/{kept * bits}", strict=False)
    assert reverse_network(dns.name.from_text(zone)) == network
    expected = any(network.version == n.version and network.subnet_of(n) for n in LOCAL_NETWORKS)
    assert local(zone, SOA) is expected


@given(addresses, st.sampled_from(["x", "256", "01", "-1", "ab", "0x1", "_dmarc", "1.2.3.4.5.6"]))
def test_labels_that_do_not_narrow_the_network_leave_the_name_in_its_zone(address, junk):
    """``x.1.168.192.in-addr.arpa.`` is no address but lies in 192.168.1.0/24's zone, so it goes where that does;
    so do labels beyond a whole address."""
    name = ptr_name(address)
    assert local(f"{junk}.{name}", PTR) is is_local_address(address)


@pytest.mark.parametrize(
    "name,network",
    [
        ("in-addr.arpa.", "0.0.0.0/0"),
        ("10.in-addr.arpa.", "10.0.0.0/8"),
        ("5.300.in-addr.arpa.", "0.0.0.0/0"),  # 300 is no octet: nothing to its left counts
        ("7.01.168.192.in-addr.arpa.", "192.168.0.0/16"),
        ("ip6.arpa.", "::/0"),
        ("d.f.ip6.arpa.", "fd00::/8"),
        ("D.F.ip6.arpa.", "fd00::/8"),
        ("g.d.f.ip6.arpa.", "fd00::/8"),
        ("10.d.f.ip6.arpa.", "fd00::/8"),
        ("example.", None),
        ("in-addr.arpa.example.", None),
    ],
)
def test_reverse_networks(name, network):
    expected = None if network is None else ipaddress.ip_network(network)
    assert reverse_network(dns.name.from_text(name)) == expected


@pytest.mark.parametrize(
    "name,expected",
    [
        ("in-addr.arpa.", False),
        ("100.in-addr.arpa.", False),  # 100.0.0.0/8 is mostly public
        ("64.100.in-addr.arpa.", True),
        ("172.in-addr.arpa.", False),
        ("16.172.in-addr.arpa.", True),
        ("c.f.ip6.arpa.", True),
        ("f.ip6.arpa.", False),
        ("8.e.f.ip6.arpa.", True),
        ("b.e.f.ip6.arpa.", True),
        ("c.e.f.ip6.arpa.", False),
        ("e.f.ip6.arpa.", False),
    ],
)
def test_reverse_zones_of_the_local_ranges(name, expected):
    assert local(name, SOA) is expected
    assert local(name, PTR) is expected


SUFFIX_LABELS = st.sampled_from(["lan", "LAN", "home", "arpa", "example", "cdn", "a", "x", "in-addr", "ip6", "1", "10"])
KEY_LABELS = st.one_of(SUFFIX_LABELS, st.sampled_from(["xlan", "a\\.lan", "b\\046lan", "x\\032y", "168", "192"]))


@given(
    st.lists(KEY_LABELS, max_size=6).map(lambda labels: ".".join(labels) + "."),
    st.lists(st.lists(SUFFIX_LABELS, max_size=3).map(lambda labels: ".".join(labels) or "."), max_size=3),
    st.lists(st.sampled_from(["cdn.example", "lan.", "x\\.lan", "."]), max_size=2),
)
def test_the_text_reading_of_names_agrees_with_dnspythons(name, local_suffixes, bypass_suffixes):
    key = (name, A, 1)
    assert goes_local(key, local_suffixes, bypass_suffixes) is parsed_goes_local(key, local_suffixes, bypass_suffixes)
