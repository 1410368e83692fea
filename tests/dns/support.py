"""Queries and responses for the DNS tests, built with dnspython."""

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import strategies as st

from relay.dns.wire import Key

KEY_A: Key = ("www.example.com.", dns.rdatatype.A, dns.rdataclass.IN)
SOA = "ns.example.com. hostmaster.example.com. 1 7200 900 1209600 {minimum}"


def query(name="www.example.com.", rdtype="A", *, id=0x1234, **edns) -> bytes:
    message = dns.message.make_query(name, rdtype, id=id)
    if edns:  # not through make_query: bookworm's dnspython (2.3) sends version 0 for its use_edns=1
        message.use_edns(edns.pop("use_edns", 0), **edns)
    return message.to_wire()


def response(
    name="www.example.com.",
    rdtype="A",
    *,
    id=0x1234,
    answer=(),
    authority=(),
    additional=(),
    rcode=dns.rcode.NOERROR,
    flags=0,
    **edns,
) -> bytes:
    """A response; each record is (name, ttl, rdtype, rdata text)."""
    reply = dns.message.make_response(dns.message.make_query(name, rdtype, id=id, **edns), recursion_available=True)
    for section, records in ((reply.answer, answer), (reply.authority, authority), (reply.additional, additional)):
        for owner, ttl, type_, text in records:
            section.append(dns.rrset.from_text(owner, ttl, "IN", type_, text))
    reply.set_rcode(rcode)
    reply.flags |= flags
    return reply.to_wire()


def positive(ttl=300, **kwargs) -> bytes:
    return response(answer=[("www.example.com.", ttl, "A", "192.0.2.1")], **kwargs)


def nxdomain(soa_ttl=900, minimum=600, **kwargs) -> bytes:
    return response(
        rcode=dns.rcode.NXDOMAIN, authority=[("example.com.", soa_ttl, "SOA", SOA.format(minimum=minimum))], **kwargs
    )


def ttls(wire: bytes) -> dict[str, list[int]]:
    message = dns.message.from_wire(wire)
    return {
        "answer": [rrset.ttl for rrset in message.answer],
        "authority": [rrset.ttl for rrset in message.authority],
        "additional": [rrset.ttl for rrset in message.additional],
    }


def with_counts(wire: bytes, qd=None, an=None, ns=None, ar=None) -> bytes:
    """``wire`` with some header counts replaced: the messages dnspython refuses to build."""
    counts = list(struct.unpack_from("!4H", wire, 4))
    for index, value in enumerate((qd, an, ns, ar)):
        if value is not None:
            counts[index] = value
    return wire[:4] + struct.pack("!4H", *counts) + wire[12:]


labels = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=20),  # any octets: escaped in the key's text
)
names = st.lists(labels, min_size=0, max_size=5).map(lambda parts: dns.name.Name([*parts, b""]))
rdtypes = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX, dns.rdatatype.TXT, 65, 999])
rdclasses = st.sampled_from([dns.rdataclass.IN, dns.rdataclass.CH])
edns_options = st.one_of(
    st.just({"use_edns": False}),
    st.builds(lambda size: {"use_edns": 0, "payload": size}, st.integers(0, 65535)),
)


@st.composite
def valid_queries(draw) -> bytes:
    """Any query a client may send: any name (any case, any octets), type, class, ID, RD, CD, EDNS or not."""
    message = dns.message.make_query(
        draw(names), draw(rdtypes), draw(rdclasses), id=draw(st.integers(0, 0xFFFF)), **draw(edns_options)
    )
    message.flags = dns.flags.Flag(draw(st.sampled_from([0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD])))
    return message.to_wire()


def big_response() -> bytes:
    """200 A records (about 3.2 KB) with an OPT offering 1232 bytes: larger than its own payload."""
    message = dns.message.from_wire(positive(use_edns=0))
    message.answer = [
        dns.rrset.from_text_list("www.example.com.", 300, "IN", "A", [f"192.0.2.{i}" for i in range(1, 201)])
    ]
    return message.to_wire(max_size=65535)


def mangled(draw, wire: bytes, mangles: list[str]) -> bytes:
    """``wire`` with one of ``mangles`` done to it: "none", "junk" (bytes after it), "cut" (its end cut off),
    "flip" (a bit flipped), "count" (a header count off by one)."""
    wire = bytearray(wire)
    mangle = draw(st.sampled_from(mangles))
    if mangle == "junk":
        wire += draw(st.binary(min_size=1, max_size=4))
    elif mangle == "cut":
        del wire[draw(st.integers(0, len(wire) - 1)) :]
    elif mangle == "flip":
        wire[draw(st.integers(0, len(wire) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif mangle == "count":
        wire[draw(st.integers(4, 11))] ^= 1
    return bytes(wire)
