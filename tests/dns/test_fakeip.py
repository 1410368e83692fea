"""The fake-IP pool: allocation, recycling, the reverse map, its DNS answers and its store."""

import ipaddress
import os
import zlib

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dns.fakeip import MAX_STORE_BYTES, MAX_STORE_TEXT, STORE_HEADER, CorruptStore, FakeIps, encode
from relay.dns.message import parse_query
from tests.dns.support import query

DEFAULT_RANGES = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00::/18")]


def pool(*ranges: str, excluded=(), max_names: int = 32768) -> FakeIps:
    networks = [ipaddress.ip_network(text) for text in ranges] or DEFAULT_RANGES
    return FakeIps(networks, list(excluded), max_names)


def ask(fake_ips: FakeIps, name: str, rdtype: str = "A"):
    """(outcome, the addresses answered) or None when the pool leaves the query to the resolvers."""
    answered = fake_ips.answer(parse_query(query(name, rdtype)))
    if answered is None:
        return None
    outcome, wire = answered
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.NOERROR
    assert all(rrset.ttl == 1 for rrset in reply.answer)
    return outcome, [rdata.address for rrset in reply.answer for rdata in rrset]


def address(fake_ips: FakeIps, name: str, rdtype: str = "A") -> str:
    outcome, addresses = ask(fake_ips, name, rdtype)
    assert outcome == "fake-ip" and len(addresses) == 1
    return addresses[0]


# --- allocation -------------------------------------------------------------------------------------------------------


def test_names_get_the_lowest_free_addresses_never_the_network_address():
    fake_ips = pool()
    assert address(fake_ips, "one.example") == "198.18.0.1"
    assert address(fake_ips, "two.example") == "198.18.0.2"
    assert address(fake_ips, "one.example", "AAAA") == "fc00::1"
    assert fake_ips.in_use() == {4: 2, 6: 1}


def test_a_name_keeps_its_address_whatever_its_casing_or_trailing_dot():
    fake_ips = pool()
    first = address(fake_ips, "www.example.com")
    address(fake_ips, "other.example")
    assert address(fake_ips, "WWW.Example.COM.") == first
    assert fake_ips.name_for(first) == "www.example.com"


def test_the_answer_is_the_name_as_the_client_wrote_it_with_ttl_1():
    wire = pool().answer(parse_query(query("Mixed.Example.", "A", id=0x77)))[1]
    reply = dns.message.from_wire(wire)
    assert reply.id == 0x77 and str(reply.answer[0].name) == "Mixed.Example." and reply.answer[0].ttl == 1


def test_ranges_are_used_one_after_another_without_their_first_and_last_address():
    fake_ips = pool("10.99.0.0/24", "10.98.0.0/24")
    given = [address(fake_ips, f"n{i}.example") for i in range(254 + 2)]
    assert given[0] == "10.99.0.1" and given[253] == "10.99.0.254"
    assert given[254:] == ["10.98.0.1", "10.98.0.2"]
    assert len(set(given)) == len(given)


def test_a_full_pool_gives_the_address_of_the_name_used_longest_ago():
    fake_ips = pool("10.99.0.0/24")
    for i in range(254):
        address(fake_ips, f"n{i}.example")
    address(fake_ips, "n0.example")  # asked again: now the most recently used
    assert fake_ips.name_for("10.99.0.3") == "n2.example"  # a connection to it uses it too
    recycled = address(fake_ips, "new.example")
    assert recycled == "10.99.0.2"  # n1's: n0 was asked again, n2 connected to
    assert fake_ips.name_for("10.99.0.2") == "new.example"
    assert ask(fake_ips, "n1.example")[1] == ["10.99.0.4"]  # n1 comes back: n3 (the next oldest) gives way
    assert fake_ips.in_use() == {4: 254} and fake_ips.recycled() == 2


def test_max_names_bounds_a_large_range():
    fake_ips = pool("198.18.0.0/15", max_names=3)
    given = {address(fake_ips, f"n{i}.example") for i in range(10)}
    assert given == {"198.18.0.1", "198.18.0.2", "198.18.0.3"} and fake_ips.in_use() == {4: 3}


def test_the_reverse_map_knows_only_addresses_it_gave():
    fake_ips = pool()
    given = address(fake_ips, "www.example.com", "AAAA")
    assert fake_ips.name_for(given) == "www.example.com"
    assert fake_ips.name_for("fc00::99") is None and fake_ips.name_for("198.18.0.1") is None
    assert fake_ips.name_for("192.0.2.1") is None and fake_ips.name_for("2001:db8::1") is None
    assert fake_ips.is_fake("198.19.255.254") and fake_ips.is_fake("::ffff:198.18.0.9") and fake_ips.is_fake("fc00::9")
    assert not fake_ips.is_fake("198.20.0.1") and not fake_ips.is_fake("fc00:4000::1")


def test_an_ipv4_mapped_address_finds_its_name():
    fake_ips = pool()
    given = address(fake_ips, "www.example.com")
    assert fake_ips.name_for(f"::ffff:{given}") == "www.example.com"


# --- which queries it answers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pool.ntp.org", "2.debian.pool.ntp.org", "printer.lan", "MSFTNCSI.com"])
def test_excluded_names_are_left_to_the_resolvers(name):
    fake_ips = pool(excluded=["pool.ntp.org", "lan", "msftncsi.com"])
    assert ask(fake_ips, name) is None and ask(fake_ips, name, "AAAA") is None and ask(fake_ips, name, "HTTPS") is None


def test_a_suffix_excludes_whole_labels_only():
    assert ask(pool(excluded=["lan"]), "plan.example")[0] == "fake-ip"
    assert ask(pool(excluded=["example.com"]), "myexample.com")[0] == "fake-ip"


@pytest.mark.parametrize("name", ["printer", "localhost", "a.localhost", "1.2.3.4", "-bad-.example", "."])
def test_single_labels_and_names_no_proxy_could_be_asked_for_are_left_to_the_resolvers(name):
    assert ask(pool(), name) is None


@pytest.mark.parametrize("rdtype", ["HTTPS", "SVCB"])
def test_https_and_svcb_get_no_data_so_no_real_address_hint_reaches_the_client(rdtype):
    fake_ips = pool()
    assert ask(fake_ips, "www.example.com", rdtype) == ("no-data", [])
    assert fake_ips.in_use() == {4: 0, 6: 0}


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "CNAME", "PTR", "ANY", "NS"])
def test_other_types_are_left_to_the_resolvers(rdtype):
    assert ask(pool(), "www.example.com", rdtype) is None


def test_another_class_is_left_to_the_resolvers():
    wire = dns.message.make_query("www.example.com", "A", "CH").to_wire()
    assert pool().answer(parse_query(wire)) is None


def test_without_an_ipv6_range_aaaa_gets_no_data_not_a_real_address():
    fake_ips = pool("198.18.0.0/15")
    assert ask(fake_ips, "www.example.com", "AAAA") == ("no-data", [])
    assert ask(fake_ips, "www.example.com", "A")[0] == "fake-ip"


# --- the store --------------------------------------------------------------------------------------------------------


def filled(count: int = 5, *ranges: str) -> FakeIps:
    fake_ips = pool(*ranges)
    for i in range(count):
        address(fake_ips, f"n{i}.example")
        address(fake_ips, f"n{i}.example", "AAAA")
    return fake_ips


def mapping(fake_ips: FakeIps) -> dict:
    return {version: list(family.by_name.items()) for version, family in fake_ips.families.items()}


def test_a_store_round_trip_keeps_every_address_and_which_was_used_longest_ago():
    before = filled()
    address(before, "n0.example")  # n0 is now the most recently used IPv4 name
    after = pool()
    assert after.load(before.dump()) == 0
    assert mapping(after) == mapping(before)
    assert list(after.families[4].by_name)[-1] == "n0.example"
    assert address(after, "n3.example") == "198.18.0.4" and address(after, "new.example") == "198.18.0.6"


def test_dump_resets_the_change_count_and_only_new_names_count():
    fake_ips = filled(3)
    assert fake_ips.changes == 6
    fake_ips.dump()
    address(fake_ips, "n1.example")
    fake_ips.name_for("198.18.0.1")
    assert fake_ips.changes == 0
    address(fake_ips, "new.example")
    assert fake_ips.changes == 1


def test_the_store_is_compact():
    fake_ips = filled(1000)
    data = fake_ips.dump()
    assert len(data) < 2000 * 8  # under 8 bytes a name for these; text lines would be about 25


def test_names_whose_address_left_the_ranges_are_left_out():
    before = filled(5)
    after = pool("198.18.0.0/15", max_names=3)  # no IPv6 range now, and only 3 IPv4 addresses
    assert after.load(before.dump()) == 5 + 2
    assert after.in_use() == {4: 3}
    assert address(after, "new.example") == "198.18.0.1"  # full: n0's, used longest ago
    assert after.name_for("198.18.0.3") == "n2.example"


def test_holes_a_load_leaves_are_given_out_before_recycling():
    before = filled(3)
    text = zlib.decompress(before.dump()[len(STORE_HEADER) :]).decode()
    kept = "".join(line + "\n" for line in text.splitlines() if not line.startswith("198.18.0.2 "))
    after = pool()
    after.load(STORE_HEADER + zlib.compress(kept.encode()))
    assert address(after, "new.example") == "198.18.0.2"
    assert address(after, "newer.example") == "198.18.0.4"


def test_every_truncation_of_a_store_is_corrupt_and_leaves_the_pool_empty():
    data = filled(50).dump()
    for length in range(len(data)):
        fake_ips = filled(2)
        with pytest.raises(CorruptStore):
            fake_ips.load(data[:length])
        assert fake_ips.in_use() == {4: 0, 6: 0}


def test_an_empty_pool_round_trips():
    fake_ips = pool()
    assert fake_ips.load(pool().dump()) == 0 and fake_ips.in_use() == {4: 0, 6: 0}


def store_of(text: str) -> bytes:
    return STORE_HEADER + zlib.compress(text.encode())


@pytest.mark.parametrize(
    "data,complaint",
    [
        (b"", "does not begin"),
        (b"relay fake-ips 2\n", "does not begin"),
        (STORE_HEADER + b"not zlib at all", "damaged"),
        (store_of("198.18.0.1 a.example\n") + b"more", "truncated"),
        (store_of("198.18.0.1 a.example"), "truncated"),
        (store_of("198.18.0.1 a.example\n198.18.0.2 a.example\n"), "twice"),
        (store_of("198.18.0.1 a.example\n198.18.0.1 b.example\n"), "twice"),
        (store_of("198.18.0.1 A.example\n"), "not an address and a name"),
        (store_of("198.18.0.1 bad_name\n"), "not an address and a name"),
        (store_of("198.18.0.1\n"), "not an address and a name"),
        (store_of("not-an-address a.example\n"), "not an address and a name"),
        (store_of("198.18.0.1 a.example\r\n"), "not an address and a name"),
        (store_of("198.18.0.1 ä.example\n"), "not an address and a name"),
        (STORE_HEADER + zlib.compress(b"\n" * (MAX_STORE_TEXT + 1)), "more than a store holds"),
    ],
)
def test_a_corrupt_store_says_what_is_wrong(data, complaint):
    with pytest.raises(CorruptStore, match=complaint):
        pool().load(data)


@given(st.binary(max_size=200), st.integers(0, 10_000))
def test_damaged_stores_raise_nothing_but_corrupt_store(garbage, position):
    data = bytearray(filled(20).dump())
    at = position % (len(data) + 1)
    damaged = bytes(data[:at]) + garbage + bytes(data[at + len(garbage) :])
    fake_ips = pool()
    try:
        fake_ips.load(damaged)
    except CorruptStore:
        assert fake_ips.in_use() == {4: 0, 6: 0}


# --- properties ------------------------------------------------------------------------------------------------------

names = st.sampled_from([f"n{i}.example" for i in range(40)])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), names, st.sampled_from(["A", "AAAA"])),
        st.tuples(st.just("connect"), st.integers(0, 60), st.sampled_from([4, 6])),
        st.tuples(st.just("reload"), st.none(), st.none()),
    ),
    max_size=120,
)


@settings(max_examples=200)
@given(steps)
def test_the_pool_stays_a_bounded_one_to_one_map_whatever_happens(steps):
    """Names and addresses map one to one within each family's capacity; a name asked twice in a row keeps its
    address; an address connected to names its holder; a store round trip changes nothing."""
    fake_ips = FakeIps([ipaddress.ip_network("10.99.0.0/24"), ipaddress.ip_network("fd99::/120")], [], max_names=16)
    for kind, what, which in steps:
        if kind == "ask":
            given = address(fake_ips, what, which)
            assert address(fake_ips, what, which) == given
            assert fake_ips.name_for(given) == what
        elif kind == "connect":
            text = f"10.99.0.{what}" if which == 4 else f"fd99::{what:x}"
            held = fake_ips.families[which].by_number.get(fake_ips.families[which].number(ipaddress.ip_address(text)))
            assert fake_ips.name_for(text) == held
        else:
            before = mapping(fake_ips)
            fake_ips.load(fake_ips.dump())
            assert mapping(fake_ips) == before
        for family in fake_ips.families.values():
            assert len(family.by_name) == len(family.by_number) <= 16
            assert all(family.by_number[number] == name for name, number in family.by_name.items())
            assert all(number < family.capacity for number in family.by_number)


def test_a_snapshot_encodes_the_pool_as_it_was_however_it_changed_since():
    fake_ips = filled(3)
    snapshot = fake_ips.snapshot()
    address(fake_ips, "later.example")
    address(fake_ips, "n0.example")
    restored = pool()
    restored.load(encode(snapshot))
    assert restored.name_for("198.18.0.4") is None and list(restored.families[4].by_name)[-1] == "n2.example"


def test_the_largest_store_zlib_can_make_is_not_refused_as_too_large():
    text = os.urandom(MAX_STORE_TEXT)  # incompressible: what zlib adds at most
    assert len(STORE_HEADER + zlib.compress(text)) <= MAX_STORE_BYTES
