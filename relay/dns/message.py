"""DNS messages as the service needs them: parse a client's query, build its replies, judge upstream responses.

Callers pass and get wire bytes; dnspython does the encoding and decoding, but for the usual shapes of
queries and responses, which relay.dns.wire reads (and this module writes) the same way without it. Nothing
here raises on malformed input except ``parse_query`` (``BadQuery``): the other functions answer SERVFAIL,
False or None.
"""

import copy
import functools
import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relay.dns.wire import (
    EDNS_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_TTL,
    MAX_UDP_PAYLOAD,
    MIN_UDP_PAYLOAD,
    OUR_OPT,
    TYPE_CLASS,
    Key,
    Peek,
    ResponsePeek,
    peek_query,
    peek_response,
    plain_wire_name,
)

# dnspython caps to_wire() at a message's own EDNS payload unless told otherwise; we truncate for UDP ourselves.
MAX_MESSAGE = 65535

# dnspython mostly raises DNSException on bad wire data, but its rdata validators raise ValueError
# (UnicodeError among them) and some readers index or unpack past the end.
PARSE_ERRORS = (dns.exception.DNSException, ValueError, IndexError, KeyError, struct.error)

# Question types that any record in the answer section answers: no CNAME chain follows them.
ANSWERED_BY_ANY_RECORD = (dns.rdatatype.CNAME, dns.rdatatype.ANY)


class BadQuery(Exception):
    """A datagram or frame that is not a query we answer.

    ``reply`` is the error to send back (FORMERR, NOTIMP for other opcodes, BADVERS for EDNS > 0) when the header
    could be read; None: drop it silently (too short to address, or a response: answering those invites loops).
    """

    def __init__(self, message: str, reply: bytes | None):
        super().__init__(message)
        self.reply = reply


class Query:
    """A client's query: ``message`` is dnspython's parse of ``wire`` (never modified), made when first asked for
    if the query was of the usual shape (``peek``), which the miss path answers without it."""

    __slots__ = ("id", "key", "udp_limit", "wire", "peek", "_message")

    def __init__(
        self,
        id: int,
        key: Key,
        udp_limit: int,  # 512 without EDNS, else the client's size clamped to [512, MAX_UDP_PAYLOAD]
        wire: bytes,  # as received
        message: dns.message.Message | None = None,
        peek: Peek | None = None,
    ):
        self.id, self.key, self.udp_limit, self.wire = id, key, udp_limit, wire
        self.peek, self._message = peek, message

    @property
    def message(self) -> dns.message.Message:
        if self._message is None:
            self._message = dns.message.from_wire(self.wire)  # it parses: peek_query read it (tested)
        return self._message

    def __repr__(self) -> str:
        return f"Query(id={self.id}, key={self.key!r}, udp_limit={self.udp_limit})"


def parse_query(wire: bytes) -> Query:
    """The query in ``wire``, or BadQuery with the reply it deserves."""
    peek = peek_query(wire)
    if peek is not None:
        return Query(peek.id, peek.key, peek.udp_limit, wire, peek=peek)
    return read_query(wire)


def read_query(wire: bytes) -> Query:
    """parse_query by dnspython, for any shape of query."""
    if len(wire) < HEADER_SIZE:
        raise BadQuery("shorter than a DNS header", None)
    # The two header fields that decide how to answer, read before dnspython: it cannot parse every opcode.
    id_, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        raise BadQuery("a response, not a query", None)
    if opcode(flags) != dns.opcode.QUERY:
        raise BadQuery("opcode is not QUERY", _header_reply(id_, flags, dns.rcode.NOTIMP))
    try:
        message = dns.message.from_wire(wire)
    except PARSE_ERRORS as e:
        raise BadQuery(f"malformed query: {type(e).__name__}", _header_reply(id_, flags, dns.rcode.FORMERR)) from None
    # As unbound: a query asks one question and carries no records but OPT.
    if len(message.question) != 1 or message.answer or message.authority:
        raise BadQuery("not exactly one question", _header_reply(id_, flags, dns.rcode.FORMERR))
    if message.edns > 0:
        raise BadQuery("EDNS version above 0", _reply(message, dns.rcode.BADVERS).to_wire())
    question = message.question[0]
    udp_limit = MIN_UDP_PAYLOAD if message.edns < 0 else min(max(message.payload, MIN_UDP_PAYLOAD), MAX_UDP_PAYLOAD)
    key = (question.name.to_text().lower(), int(question.rdtype), int(question.rdclass))
    return Query(id=id_, key=key, udp_limit=udp_limit, wire=wire, message=message)


_ID_FLAGS = struct.Struct("!HH")
_TTL = struct.Struct("!I")
_COPIED_FLAGS = int(dns.flags.RD | dns.flags.CD)


class ReplyTemplate:
    """A cached response already re-addressed as ``reply_for`` would, less what differs per client and per moment:
    the ID, the RD and CD bits, the question's casing (same length) and the TTLs, patched in place by ``render``."""

    def __init__(self, wire: bytes, ttl_offsets: list[int], ttls: list[int]):
        self.wire, self.ttl_offsets, self.ttls = wire, ttl_offsets, ttls
        self.flags = _ID_FLAGS.unpack_from(wire)[1]
        self.names = None  # what relay.dns.names read of it, kept there so that it is read once

    @classmethod
    def build(cls, key: Key, response: bytes, edns: bool) -> "ReplyTemplate | None":
        """The template of ``response`` for clients asking ``key`` with EDNS or without; None if ``reply_for``
        would not answer with it (unreadable, or SERVFAIL in its place)."""
        name, rdtype, rdclass = key
        try:
            asked = dns.message.make_query(name, rdtype, rdclass, use_edns=0 if edns else False, options=[], id=0)
            query = Query(0, key, MIN_UDP_PAYLOAD, b"", asked)
            # Rendered with every TTL at 0 and then at its most, the only bytes that differ are the TTL fields.
            wire = reply_for(query, response)
            lowest = reply_for(query, with_ttls(response, lambda _: 0))
            highest = reply_for(query, with_ttls(response, lambda _: MAX_TTL))
        except PARSE_ERRORS:
            return None
        if len(lowest) != len(wire) or len(highest) != len(wire) or wire[3] & 0x0F != response[3] & 0x0F:
            return None  # not the response re-addressed: a SERVFAIL in its place
        differ = [i for i in range(len(wire)) if lowest[i] != highest[i]]
        offsets = differ[::4]
        if differ != [offset + i for offset in offsets for i in range(_TTL.size)]:  # whole 4-byte fields only
            return None
        return cls(wire, offsets, [_TTL.unpack_from(wire, i)[0] for i in offsets])

    def render(self, peek: Peek, ttl_of) -> bytes:
        """The reply to ``peek``, each record's TTL replaced by ``ttl_of(ttl)``."""
        reply = bytearray(self.wire)
        _ID_FLAGS.pack_into(reply, 0, peek.id, (self.flags & ~_COPIED_FLAGS) | (peek.flags & _COPIED_FLAGS))
        reply[HEADER_SIZE : HEADER_SIZE + len(peek.qname)] = peek.qname
        for offset, ttl in zip(self.ttl_offsets, self.ttls):
            _TTL.pack_into(reply, offset, ttl_of(ttl))
        return bytes(reply)


def with_ttls(response: bytes, new_ttl) -> bytes:
    """``response`` with each record's TTL replaced by ``new_ttl(ttl)`` (OPT is no record). Raises one of
    PARSE_ERRORS if it cannot be read."""
    message = dns.message.from_wire(response)
    for section in (message.answer, message.authority, message.additional):
        for rrset in section:
            rrset.ttl = new_ttl(rrset.ttl)
    return message.to_wire(max_size=MAX_MESSAGE, want_shuffle=False)


def upstream_query(key: Key, *, id: int) -> bytes:
    """The query we send upstream for ``key``: RD set, EDNS0 with payload 1232, no client options copied.
    Written directly for a plain name (what peek_query takes), byte for byte what dnspython writes (tested)."""
    name, rdtype, rdclass = key
    qname = plain_wire_name(name)
    if qname is None:
        query = dns.message.make_query(
            dns.name.from_text(name), rdtype, rdclass, use_edns=0, payload=EDNS_PAYLOAD, options=[], id=id
        )
        return query.to_wire()
    return HEADER.pack(id, dns.flags.RD, 1, 0, 0, 1) + qname + TYPE_CLASS.pack(rdtype, rdclass) + OUR_OPT


def refused(query: Query) -> bytes:
    return _reply(query.message, dns.rcode.REFUSED).to_wire()


def no_data(query: Query) -> bytes:
    """NOERROR with an empty answer: the name may exist, but has no record of this type for this client."""
    return _reply(query.message, dns.rcode.NOERROR, recursion_available=True).to_wire()


def address_reply(query: Query, address: str, ttl: int) -> bytes:
    """NOERROR with one A or AAAA record (as asked) holding ``address``, owned by the name as the client wrote it."""
    reply = _reply(query.message, dns.rcode.NOERROR, recursion_available=True)
    question = query.message.question[0]
    reply.answer.append(dns.rrset.from_text(question.name, ttl, question.rdclass, question.rdtype, address))
    return reply.to_wire()


def servfail(query: Query) -> bytes:
    return _reply(query.message, dns.rcode.SERVFAIL, recursion_available=True).to_wire()


def reply_for(query: Query, response: bytes) -> bytes:
    """The upstream or cached ``response`` re-addressed to this client: its ID, its question as asked (0x20 casing),
    its RD and CD bits, OPT only if it sent one (ours, without upstream's options). SERVFAIL if unusable."""
    fast = _readdressed(query, response)
    if fast is not None:
        return fast
    try:
        # A copy of the parse the upstream answer's checks made (read_response's is shared): below, only
        # attributes are set, and the question replaced in a list of sections of the copy's own.
        parsed = read_response(response)
        message = copy.copy(parsed)
        message.sections = list(parsed.sections)
    except PARSE_ERRORS:
        return servfail(query)
    rcode = message.rcode()
    if query.message.edns < 0 and rcode > 0xF:
        return servfail(query)  # an extended rcode cannot be told to a client without EDNS
    message.id = query.id
    message.question = [query.message.question[0]]
    copied = int(dns.flags.RD | dns.flags.CD)
    message.flags = dns.flags.Flag((int(message.flags) & ~copied) | (int(query.message.flags) & copied))
    if query.message.edns < 0:
        message.use_edns(False)
    else:
        message.use_edns(0, payload=EDNS_PAYLOAD, options=[])
    message.set_rcode(rcode)  # use_edns resets the extended rcode bits
    try:
        # The records in the resolver's order (dnspython would shuffle them): the same reply from the cache's
        # template as from here, and the resolver's own rotation, if any, kept.
        return message.to_wire(max_size=MAX_MESSAGE, want_shuffle=False)
    except PARSE_ERRORS:  # TooBig: over 65535 bytes once re-encoded
        return servfail(query)


def _readdressed(query: Query, response: bytes) -> bytes | None:
    """What reply_for makes of a query and a response of the usual shapes (wire.peek_query, wire.peek_response),
    written without dnspython: the response's own bytes with the header and the question's casing replaced and
    its OPT record, last if any, replaced by ours or dropped. dnspython would write the same message, its names
    perhaps compressed otherwise (tested). None for other shapes."""
    peek, peeked = query.peek, peek_response(response)
    if peek is None or peeked is None or peeked.key != query.key:
        return None
    answers, authorities, additionals = peeked.counts
    flags = (peeked.flags & ~_COPIED_FLAGS) | (peek.flags & _COPIED_FLAGS)
    header = HEADER.pack(peek.id, flags, 1, answers, authorities, additionals + peek.edns)
    records = response[HEADER_SIZE + len(peeked.qname) : peeked.records_end]  # the question's type and class first
    reply = header + peek.qname + records + (OUR_OPT if peek.edns else b"")
    return reply if len(reply) <= MAX_MESSAGE else None


def truncated_for_udp(reply: bytes, limit: int) -> bytes:
    """``reply`` if it fits in ``limit`` bytes, else its header, question and OPT with TC set (RFC 1035 4.2.1,
    RFC 7766 5): the client retries over TCP. ``limit`` is at least 512, which always fits those.
    Empty (send nothing) if ``reply`` is too long and cannot be parsed: it was not one of ours."""
    if len(reply) <= limit:
        return reply
    try:
        message = dns.message.from_wire(reply)
        message.answer.clear()
        message.authority.clear()
        message.additional.clear()
        message.flags |= dns.flags.TC
        wire = message.to_wire(max_size=MAX_MESSAGE)
    except PARSE_ERRORS:
        return b""
    return wire if len(wire) <= limit else b""


@functools.lru_cache(maxsize=64)
def read_response(response: bytes) -> dns.message.Message:
    """``response`` parsed, for readers only (never modify what it returns): an upstream answer is checked,
    its TTL read and its names learnt, and one parse serves them all. Raises one of PARSE_ERRORS."""
    return dns.message.from_wire(response)


def response_matches(key: Key, id: int, response: bytes) -> bool:
    """Whether ``response`` answers our query for ``key`` with ``id``; anything else is discarded (RFC 5452)."""
    peeked = peek_response(response)
    if peeked is not None and peeked.id == id and peeked.key == key:  # QR and opcode QUERY checked
        return True
    try:  # dnspython decides the rest: a key in other casing or with escapes may still name the same question
        message = read_response(response)
    except PARSE_ERRORS:
        return False
    if not message.flags & dns.flags.QR or message.id != id or opcode(message.flags) != dns.opcode.QUERY:
        return False
    if len(message.question) != 1:
        return False
    question = message.question[0]
    name, rdtype, rdclass = key
    return (question.name, question.rdtype, question.rdclass) == (dns.name.from_text(name), rdtype, rdclass)


def ttl_of(response: bytes) -> int | None:
    """How long ``response`` may be cached, in seconds; None: not at all.

    Positive answers: the lowest TTL of the answer section. Negative ones (NXDOMAIN, or no record of the type asked,
    CNAME chains included): also the SOA's negative TTL, min(SOA TTL, SOA MINIMUM) (RFC 2308 5); without an SOA they
    are not cached. Nor are SERVFAIL, REFUSED and other errors, or truncated responses.
    """
    peeked = peek_response(response)
    if peeked is not None:
        return peeked_ttl(peeked)
    try:
        return parsed_ttl(read_response(response))
    except PARSE_ERRORS:
        return None


def parsed_ttl(message: dns.message.Message) -> int | None:
    """ttl_of for a response dnspython parsed."""
    rcode = message.rcode()
    if message.flags & dns.flags.TC or rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or not message.question:
        return None
    ttls = [rrset.ttl for rrset in message.answer]
    asked = message.question[0].rdtype
    answered = any(asked in (rrset.rdtype, *ANSWERED_BY_ANY_RECORD) for rrset in message.answer)
    if rcode == dns.rcode.NXDOMAIN or not answered:
        soas = [rrset for rrset in message.authority if rrset.rdtype == dns.rdatatype.SOA]
        if not soas:
            return None
        ttls += [min(rrset.ttl, rdata.minimum) for rrset in soas for rdata in rrset]
    return min(ttls) if ttls else None


def peeked_ttl(peeked: ResponsePeek) -> int | None:
    """ttl_of for a response of the usual shape, read as parsed_ttl reads it (a set's records have one TTL)."""
    rcode = peeked.flags & 0x0F
    if peeked.flags & dns.flags.TC or rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return None
    ttls = [record.ttl for record in peeked.answer]
    asked = peeked.key[1]
    answered = any(asked in (record.rdtype, *ANSWERED_BY_ANY_RECORD) for record in peeked.answer)
    if rcode == dns.rcode.NXDOMAIN or not answered:
        soas = [min(record.ttl, record.value) for record in peeked.authority if record.rdtype == dns.rdatatype.SOA]
        if not soas:
            return None
        ttls += soas
    return min(ttls) if ttls else None


def _reply(query: dns.message.Message, rcode: int, recursion_available: bool = False) -> dns.message.Message:
    """An empty reply to ``query`` with ``rcode``: its ID, question, RD and CD; OPT if the query had one."""
    reply = dns.message.make_response(query, recursion_available=recursion_available, our_payload=EDNS_PAYLOAD)
    reply.flags |= query.flags & dns.flags.CD  # make_response copies RD only; RFC 4035 3.2.2 wants CD too
    reply.set_rcode(rcode)
    return reply


def opcode(flags: int) -> int:
    """The header's opcode as a number: dnspython before 2.4 (bookworm's 2.3) raises ValueError for the unassigned."""
    return (flags & 0x7800) >> 11


def _header_reply(id_: int, flags: int, rcode: int) -> bytes:
    """A header-only reply for a query we could not parse: nothing of it is echoed but its ID, opcode and RD."""
    reply = dns.message.Message(id=id_)
    reply.flags = dns.flags.QR | (flags & dns.flags.RD)
    reply.set_opcode(opcode(flags))
    reply.set_rcode(rcode)
    return reply.to_wire()


# Metric labels stay few: any other type counts as "other".
LABELLED_TYPES = frozenset(
    dns.rdatatype.from_text(name)
    for name in ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "HTTPS", "SVCB", "CAA", "DS", "DNSKEY")
)


_TYPE_LABELS = {rdtype: dns.rdatatype.to_text(rdtype) for rdtype in LABELLED_TYPES}


def type_label(rdtype: int) -> str:
    return _TYPE_LABELS.get(rdtype, "other")


def rcode_text(response: bytes) -> str:
    """The response code's name (NOERROR, NXDOMAIN, ...), from the header alone; "short" if there is none."""
    if len(response) < HEADER_SIZE:
        return "short"
    return dns.rcode.to_text(response[3] & 0x0F)
