"""The cache-hit path reads queries and writes replies without dnspython: it must agree with the path that uses it.

peek_query against read_query (dnspython's reading) on the same bytes; a reply rendered from a cache template against
message.reply_for of the aged cached response, byte for byte.
"""

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dns.cache import Cache
from relay.dns.message import BadQuery, parse_query, read_query, read_response, reply_for, ttl_of, upstream_query
from relay.dns.wire import peek_query
from tests.dns.support import SOA, mangled, query, response

LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
ODD_LABEL = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8),
    st.tuples(LABEL, LABEL).map("\\.".join),  # a dot within a label
)
NAMES = st.lists(st.one_of(LABEL, LABEL, ODD_LABEL), min_size=1, max_size=5).map(lambda labels: ".".join(labels) + ".")
TYPES = st.sampled_from(["A", "AAAA", "MX", "TXT", "HTTPS", "PTR", "ANY"])


def cookie(size: int) -> dns.edns.GenericOption:
    return dns.edns.GenericOption(dns.edns.COOKIE, bytes(size))


@st.composite
def queries(draw) -> bytes:
    """Queries as clients send them, and some they should not: odd names, options, flags, junk, cuts."""
    try:
        name = dns.name.from_text(draw(NAMES))
    except dns.exception.DNSException:
        name = dns.name.from_text("fallback.example.")
    edns = draw(st.sampled_from([None, 0, 1]))
    options = draw(
        st.lists(
            st.one_of(st.sampled_from([8, 16, 24, 40, 5, 41]).map(cookie), st.just(dns.edns.GenericOption(12, b""))),
            max_size=2,
        )
    )
    made = dns.message.make_query(
        name,
        draw(TYPES),
        use_edns=edns if edns is not None else False,
        payload=draw(st.integers(0, 65535)),
        options=options if edns is not None else None,
        id=draw(st.integers(0, 65535)),
    )
    made.flags = dns.flags.Flag(draw(st.integers(0, 0xFFFF)) & ~0x7800 if draw(st.booleans()) else int(made.flags))
    try:
        wire = bytearray(made.to_wire())
    except dns.exception.DNSException:
        wire = bytearray(dns.message.make_query("fallback.example.", "A").to_wire())
    if draw(st.booleans()):
        wire[12:] = wire[12:].swapcase() if draw(st.booleans()) else wire[12:]
    return mangled(draw, wire, ["none", "none", "junk", "cut", "flip"])


@settings(max_examples=1500)
@given(queries())
def test_what_peek_reads_parse_query_reads_alike(wire):
    peek = peek_query(wire)
    if peek is None:
        return
    query = read_query(wire)  # dnspython's reading: never BadQuery where peek read a query
    edns = query.message.edns >= 0
    assert (peek.id, peek.key, peek.udp_limit, peek.edns) == (query.id, query.key, query.udp_limit, edns)
    assert peek.flags == struct.unpack_from("!H", wire, 2)[0]


@given(st.binary(max_size=64))
def test_peek_never_raises(wire):
    peek = peek_query(wire)
    if peek is not None:
        read_query(wire)


@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize("name", ["www.example.com.", "WwW.ExAmPlE.cOm.", "a_b-1.example.com."])
def test_the_usual_queries_take_the_hot_path(name, edns):
    options = [cookie(8)] if edns else None
    wire = dns.message.make_query(name, "AAAA", use_edns=0 if edns else False, options=options).to_wire()
    peek = peek_query(wire)
    assert peek is not None and peek.key == (name.lower(), dns.rdatatype.AAAA, 1) and peek.edns is edns
    assert peek.qname == wire[12 : 12 + len(peek.qname)]


@pytest.mark.parametrize(
    "wire",
    [
        query(use_edns=0, options=[dns.edns.GenericOption(8, b"x")]),
        query("www.ex\\.ample.com."),
        query(use_edns=1),
    ],
    ids=["other-option", "escaped-dot", "edns-1"],
)
def test_unusual_queries_are_left_to_dnspython(wire):
    assert peek_query(wire) is None


def cached_responses() -> list[tuple[str, str, bytes]]:
    return [
        ("www.example.com.", "A", response(answer=[("www.example.com.", 300, "A", f"192.0.2.{i}") for i in (1, 2, 3)])),
        (
            "cdn.example.com.",
            "AAAA",
            response(
                "cdn.example.com.",
                "AAAA",
                answer=[
                    ("cdn.example.com.", 3600, "CNAME", "edge.example.net."),
                    ("edge.example.net.", 20, "AAAA", "2001:db8::1"),
                ],
            ),
        ),
        (
            "gone.example.com.",
            "A",
            response(
                "gone.example.com.",
                rcode=dns.rcode.NXDOMAIN,
                authority=[("example.com.", 900, "SOA", SOA.format(minimum=60))],
            ),
        ),
        (
            "mail.example.com.",
            "MX",
            response(
                "mail.example.com.",
                "MX",
                answer=[("mail.example.com.", 120, "MX", "10 mx.example.com.")],
                additional=[("mx.example.com.", 50, "A", "192.0.2.9")],
                use_edns=0,
            ),
        ),
    ]


@settings(max_examples=300)
@given(
    which=st.integers(0, 3),
    casing=st.integers(0, 2**31),
    flags=st.integers(0, 0xFFFF),
    edns=st.booleans(),
    with_cookie=st.booleans(),
    elapsed=st.floats(0, 400),
    id_=st.integers(0, 0xFFFF),
)
def test_a_reply_from_the_template_is_the_reply_dnspython_makes(which, casing, flags, edns, with_cookie, elapsed, id_):
    name, rdtype, cached = cached_responses()[which]
    now = [1000.0]
    cache = Cache(100, 0, 86400, clock=lambda: now[0])
    asked = "".join(c.upper() if casing >> (i % 31) & 1 else c for i, c in enumerate(name))
    made = dns.message.make_query(
        asked, rdtype, use_edns=0 if edns else False, options=[cookie(8)] if edns and with_cookie else None, id=id_
    )
    made.flags = dns.flags.Flag(flags & ~0xF800)
    wire = made.to_wire()
    query, peek = parse_query(wire), peek_query(wire)
    cache.put(query.key, cached)
    now[0] += elapsed
    slow = cache.get(query.key)
    hit = cache.hit(peek)
    if slow is None or not slow[1]:
        assert hit is None  # gone or stale: the slow path's to decide
        return
    template, ttl_of = hit
    assert template.render(peek, ttl_of) == reply_for(query, slow[0])


def test_a_response_reply_for_cannot_carry_has_no_template():
    """An extended rcode cannot be told to a client without EDNS: reply_for answers SERVFAIL, so no template."""
    cache = Cache(100, 0, 86400)
    extended = dns.message.from_wire(response(use_edns=0))
    extended.set_rcode(dns.rcode.BADVERS)
    wire = dns.message.make_query("www.example.com.", "A").to_wire()
    cache.put(parse_query(wire).key, extended.to_wire())
    assert cache.hit(peek_query(wire)) is None


def test_bad_queries_stay_bad():
    with pytest.raises(BadQuery):
        parse_query(b"\x00" * 11)
    assert peek_query(b"\x00" * 11) is None


@settings(max_examples=500)
@given(name=NAMES, rdtype=TYPES, id_=st.integers(0, 0xFFFF))
def test_an_upstream_query_is_what_dnspython_writes(name, rdtype, id_):
    try:
        expected = dns.message.make_query(
            dns.name.from_text(name.lower()), rdtype, use_edns=0, payload=1232, options=[], id=id_
        ).to_wire()
    except dns.exception.DNSException:
        return
    key = (dns.name.from_text(name.lower()).to_text(), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
    assert upstream_query(key, id=id_) == expected


@pytest.mark.parametrize("name", ["a" * 63 + ".example.", "x." * 127])
def test_upstream_queries_at_the_name_limits(name):
    key = (name, dns.rdatatype.A, dns.rdataclass.IN)
    assert upstream_query(key, id=7) == dns.message.make_query(name, "A", use_edns=0, payload=1232, id=7).to_wire()


def test_re_addressing_an_answer_leaves_the_shared_parse_as_it_was():
    name, rdtype, cached = cached_responses()[3]
    before = read_response(cached).to_wire()
    for edns in (False, True):
        asked = dns.message.make_query(name.upper(), rdtype, use_edns=0 if edns else False, id=99)
        asked.flags &= ~dns.flags.RD
        reply_for(parse_query(asked.to_wire()), cached)
    assert read_response(cached).to_wire() == before and ttl_of(cached) == 120
