"""The miss path reads upstream responses without dnspython (relay.dns.wire.peek_response): wherever it reads
one, dnspython must parse the same bytes and read the same from them, and the reply written from its bytes must
be the message dnspython writes.

Responses are assembled here byte by byte, as resolvers write them (names compressed or not, records in any
order, twins, odd TTLs, OPT anywhere, trailing bytes), then cut or flipped: dnspython would tidy most of these
away if it built them.
"""

import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.dns.message
import relay.dns.names
import relay.dns.wire
from relay.dns.message import Query, parse_query, parsed_ttl, peeked_ttl, reply_for, response_matches, ttl_of
from relay.dns.names import NameBook, parsed_answered, peeked_answered
from relay.dns.wire import peek_query, peek_response
from tests.dns.support import SOA, mangled, nxdomain, positive, query, response

QUESTION = "www.example.com."
NAMES = [QUESTION, "edge.example.net.", "example.com.", "other.example.org."]
A, NS, CNAME, SOA_TYPE, MX, TXT, AAAA, OPT = 1, 2, 5, 6, 15, 16, 28, 41


def encoded(name: str, compress_to: int | None = None) -> bytes:
    if compress_to is not None:
        return struct.pack("!H", 0xC000 | compress_to)
    return b"".join(bytes((len(label),)) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"


@st.composite
def records(draw) -> bytes:
    """One resource record, its owner compressed to the question (offset 12) or written out."""
    owner = draw(st.sampled_from(NAMES))
    compressed = owner == QUESTION and draw(st.booleans())
    rdtype = draw(st.sampled_from([A, A, A, A, AAAA, AAAA, CNAME, CNAME, SOA_TYPE, MX, TXT]))
    if rdtype == A:
        rdata = socket.inet_aton(f"192.0.2.{draw(st.integers(1, 4))}")
    elif rdtype == AAAA:
        rdata = socket.inet_pton(socket.AF_INET6, f"2001:db8::{draw(st.integers(1, 4))}")
    elif rdtype == CNAME:
        target = draw(st.sampled_from(NAMES))
        rdata = encoded(target, 12 if target == QUESTION and draw(st.booleans()) else None)
    elif rdtype == SOA_TYPE:
        rdata = encoded("ns.example.com.") + encoded("hostmaster.example.com.")
        rdata += struct.pack("!5I", 1, 7200, 900, 1209600, draw(st.integers(0, 7200)))
    elif rdtype == MX:
        rdata = struct.pack("!H", 10) + encoded("mx.example.com.")
    else:
        rdata = b"\x05hello"
    if draw(st.integers(0, 29)) == 0:
        rdata = rdata[:-1] if rdata else b"\0"  # one octet short: unreadable
    rdclass = 1 if draw(st.integers(0, 29)) else draw(st.sampled_from([3, 255]))
    ttl = draw(st.sampled_from([0, 30, 300, 300, 300, 300, 3600, 3600, 0x80000000, 0xFFFFFFFF]))
    owner_wire = encoded(owner, 12 if compressed else None)
    return owner_wire + struct.pack("!HHIH", rdtype, rdclass, ttl, len(rdata)) + rdata


@st.composite
def opt_records(draw) -> bytes:
    version = draw(st.sampled_from([0, 0, 0, 1]))
    extended = draw(st.sampled_from([0, 0, 0, 1]))
    options = draw(st.sampled_from([b"", b"", struct.pack("!HH", 15, 2) + b"\0\x06"]))  # none, or an EDE
    flags = draw(st.sampled_from([0, 0x8000]))
    return b"\0" + struct.pack("!HHBBHH", OPT, 1232, extended, version, flags, len(options)) + options


@st.composite
def responses(draw) -> bytes:
    flags = dns.flags.QR | dns.flags.RD | dns.flags.RA
    flags |= draw(st.sampled_from([0, 0, dns.flags.AA, dns.flags.TC, dns.flags.AD, 0x0040]))
    flags |= draw(st.sampled_from([dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL]))
    if draw(st.integers(0, 19)) == 0:
        flags = draw(st.integers(0, 0xFFFF))
    sections = [draw(st.lists(records(), max_size=size)) for size in (4, 2, 2)]
    opt = draw(st.one_of(st.none(), opt_records()))
    if opt is not None:
        sections[2].insert(draw(st.integers(0, len(sections[2]))), opt)
    qtype = draw(st.sampled_from([A, AAAA, CNAME, MX, 255]))
    counts = [len(section) for section in sections]
    header = struct.pack("!6H", draw(st.integers(0, 0xFFFF)), flags, 1, *counts)
    question = encoded(QUESTION.upper() if draw(st.booleans()) else QUESTION) + struct.pack("!HH", qtype, 1)
    wire = header + question + b"".join(b"".join(section) for section in sections)
    return mangled(draw, wire, ["none"] * 9 + ["junk", "cut", "flip", "count"])


def parsed(wire: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire)
    except Exception:
        return None


@settings(max_examples=3000)
@given(responses())
def test_what_peek_reads_dnspython_reads_alike(wire):
    peeked, message = peek_response(wire), parsed(wire)
    if peeked is None:
        return
    assert message is not None, "read here, refused by dnspython"
    question = message.question[0]
    assert (peeked.id, peeked.flags) == (message.id, int(message.flags))
    assert peeked.key == (question.name.to_text().lower(), question.rdtype, question.rdclass)
    assert peeked.question == question.name.to_text()
    assert response_matches(peeked.key, message.id, wire)
    assert peeked_ttl(peeked) == parsed_ttl(message)
    assert peeked_answered(peeked) == parsed_answered(message)


@settings(max_examples=1500)
@given(responses(), st.integers(0, 2**31), st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 0xFFFF))
def test_a_reply_written_from_the_response_is_the_message_dnspython_writes(wire, casing, flags, edns, id_):
    asked = "".join(c.upper() if casing >> (i % 31) & 1 else c for i, c in enumerate(QUESTION))
    peeked = peek_response(wire)
    made = dns.message.make_query(asked, peeked.key[1] if peeked else "A", use_edns=0 if edns else False, id=id_)
    made.flags = dns.flags.Flag(flags & ~0xF800)
    query = parse_query(made.to_wire())
    assert query.peek is not None
    slow = reply_for(Query(query.id, query.key, query.udp_limit, query.wire, message=query.message), wire)
    fast = reply_for(query, wire)
    assert fast[:2] == id_.to_bytes(2, "big") and fast[12 : 12 + len(query.peek.qname)] == query.peek.qname
    assert dns.message.from_wire(fast).to_text().lower() == dns.message.from_wire(slow).to_text().lower()


def test_the_usual_answers_are_read_and_readdressed_without_dnspython(monkeypatch):
    cname_chain = response(
        answer=[("www.example.com.", 3600, "CNAME", "edge.example.net."), ("edge.example.net.", 20, "A", "192.0.2.7")]
    )
    usual = [positive(), positive(use_edns=0), nxdomain(), nxdomain(use_edns=0), cname_chain]
    expected = [reply_for(parse_query(query(use_edns=0)), wire) for wire in usual]

    def no_dnspython(wire):
        raise AssertionError("dnspython used")

    monkeypatch.setattr(relay.dns.message, "read_response", no_dnspython)
    monkeypatch.setattr(relay.dns.names, "read_response", no_dnspython)
    for wire, reply in zip(usual, expected):
        assert response_matches(("www.example.com.", 1, 1), 0x1234, wire)
        assert reply_for(parse_query(query(use_edns=0)), wire) == reply
    assert ttl_of(cname_chain) == 20
    assert ttl_of(nxdomain(soa_ttl=900, minimum=60)) == 60
    book = NameBook()
    book.learn("192.168.1.5", cname_chain, now=0.0)
    assert book.name_for("192.168.1.5", "192.0.2.7", now=1.0) == "www.example.com"


@pytest.mark.parametrize(
    "wire",
    [
        response("mail.example.com.", "MX", answer=[("mail.example.com.", 60, "MX", "10 mx.example.com.")]),
        response(authority=[("example.com.", 60, "SOA", SOA.format(minimum=1)), ("example.com.", 60, "NS", "ns.")]),
        positive()[:-1],
        positive() + b"\0",
    ],
    ids=["another-type", "ns-in-authority", "cut", "trailing"],
)
def test_other_shapes_are_left_to_dnspython(wire):
    assert peek_response(wire) is None


def test_the_names_read_once_stay_within_their_bound():
    for number in range(relay.dns.wire.PLAIN_NAMES_KEPT + 10):
        assert peek_query(query(f"n{number}.example.com.")).key[0] == f"n{number}.example.com."
        assert len(relay.dns.wire._plain_names) <= relay.dns.wire.PLAIN_NAMES_KEPT
    asked = query("N1.Example.COM.")
    assert peek_query(asked).qname == asked[12:28] and peek_query(asked).key[0] == "n1.example.com."
