"""DNS messages of the usual shapes read without dnspython, for the paths every query takes.

``peek_query`` reads a client's query for the cache-hit path; ``peek_response`` reads an upstream
response for the miss path (its check, its TTL, the name book and the client's reply). Each
reads only a strict subset of what dnspython reads and returns None for everything else, which
relay.dns.message then hands to dnspython: wherever a reader here returns something, dnspython
parses the same bytes and reads the same from them (tested). Sans-IO; no dnspython either.
"""

import functools
import re
import socket
import struct
from typing import NamedTuple

Key = tuple[str, int, int]  # (lower-cased qname text with trailing dot, rdtype, rdclass)

HEADER_SIZE = 12
MIN_UDP_PAYLOAD = 512  # RFC 1035: what every client can take
MAX_UDP_PAYLOAD = 4096  # what we honour of a client's EDNS buffer size at most
# What we advertise, upstream and to clients: unfragmented on any IPv6 path (DNS flag day 2020).
EDNS_PAYLOAD = 1232

HEADER = struct.Struct("!HHHHHH")  # ID, flags, question, answer, authority and additional counts
TYPE_CLASS = struct.Struct("!HH")
OPT = struct.Struct("!BHHBBHH")  # root name, type, payload, extended rcode, version, flags, rdata length
OUR_OPT = OPT.pack(0, 41, EDNS_PAYLOAD, 0, 0, 0, 0)  # EDNS 0, our payload, no flags, no options
_OPTION = struct.Struct("!HH")
_RECORD = struct.Struct("!HHIH")  # type, class, TTL, rdata length
_OPT_TYPE = 41
_COOKIE = 10  # RFC 7873: dig sends one with every query; client cookie 8 bytes, with a server cookie 16-40
# Labels the hot path takes: what dnspython writes back as the same text, lower-cased, with no escapes.
PLAIN_NAME = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
MAX_NAME = 255
_QR, _OPCODE = 0x8000, 0x7800
_A, _CNAME, _SOA, _AAAA = 1, 5, 6, 28
_IN = 1
_SOA_NUMBERS = 20  # serial, refresh, retry, expire, minimum
MAX_TTL = 0x7FFFFFFF  # RFC 2181 8: one with the top bit set reads as 0


class Peek(NamedTuple):
    """What the cache-hit path needs of a query, read by ``peek_query`` without dnspython."""

    id: int
    flags: int
    key: Key
    qname: bytes  # the question's name as the client wrote it on the wire (its 0x20 casing kept)
    edns: bool
    udp_limit: int


def _plain_question(wire: bytes) -> tuple[bytes, Key, int] | None:
    """The one question after the header when its name is plain (uncompressed labels of PLAIN_NAME's letters):
    (its name's wire bytes, its key, where the question ends); None for any other."""
    # A plain name holds no zero octet but its last: the first one after the header ends it, if it is plain.
    end = wire.find(b"\0", HEADER_SIZE) + 1
    if end <= 0 or end + TYPE_CLASS.size > len(wire):
        return None
    qname = wire[HEADER_SIZE:end]
    lowered = qname.lower()  # the same length octets: they are below 0x40
    name = _plain_names.get(lowered, False)
    if name is False:
        name = _plain_name_text(lowered)
        if len(_plain_names) >= PLAIN_NAMES_KEPT:
            _plain_names.clear()
        _plain_names[lowered] = name
    if name is None:
        return None
    return qname, (name, *TYPE_CLASS.unpack_from(wire, end)), end + TYPE_CLASS.size


# The names of recent questions, read once: the same few are asked again and again.
PLAIN_NAMES_KEPT = 4096
_plain_names: dict[bytes, str | None] = {}


def _plain_name_text(qname: bytes) -> str | None:
    """The text of a name's wire form (its labels and the root's zero octet) if it is plain, with its trailing dot."""
    labels, offset = [], 0
    while offset < len(qname) and qname[offset]:
        length = qname[offset]
        if length > 63:  # a compression pointer
            return None
        labels.append(qname[offset + 1 : offset + 1 + length])
        offset += 1 + length
    if offset + 1 != len(qname) or offset + 1 > MAX_NAME or not labels:
        return None
    name = b".".join(labels)
    if PLAIN_NAME.fullmatch(name) is None or name.count(b".") != len(labels) - 1:  # no dot within a label
        return None
    return name.decode("ascii") + "."


def plain_wire_name(name: str) -> bytes | None:
    """The wire form of a plain name's text (with its trailing dot): what _plain_name_text reads back as that
    text. None for any other name."""
    plain = name[:-1].encode("ascii", "replace")
    labels = plain.split(b".")
    if (
        not name.endswith(".")
        or PLAIN_NAME.fullmatch(plain) is None
        or len(plain) + 2 > MAX_NAME
        or max(map(len, labels)) > 63
    ):
        return None
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def peek_query(wire: bytes) -> Peek | None:
    """The usual shape of a query read fast, for answering it from the cache: one question whose name is plain
    letters, digits, ``-`` and ``_``, no records but an optional version-0 OPT carrying at most a cookie, and
    nothing after it. None for anything else: ``message.parse_query`` decides those. Wherever this returns a Peek,
    ``parse_query`` accepts the same bytes and reads the same ID, key, EDNS presence and UDP limit (tested)."""
    if len(wire) < HEADER_SIZE + 5:
        return None
    id_, flags, questions, answers, authorities, additionals = HEADER.unpack_from(wire)
    if flags & 0xF800 or questions != 1 or answers or authorities or additionals > 1:  # QR and opcode: 0
        return None
    question = _plain_question(wire)
    if question is None:
        return None
    qname, key, offset = question
    if not additionals:
        return Peek(id_, flags, key, qname, False, MIN_UDP_PAYLOAD) if offset == len(wire) else None
    if offset + OPT.size > len(wire):
        return None
    root, opt_type, payload, _, version, _, length = OPT.unpack_from(wire, offset)
    offset += OPT.size
    if root or opt_type != _OPT_TYPE or version or offset + length != len(wire):
        return None
    while offset < len(wire):
        if offset + _OPTION.size > len(wire):
            return None
        code, size = _OPTION.unpack_from(wire, offset)
        if code != _COOKIE or not (size == 8 or 16 <= size <= 40):
            return None
        offset += _OPTION.size + size
    if offset != len(wire):
        return None
    return Peek(id_, flags, key, qname, True, min(max(payload, MIN_UDP_PAYLOAD), MAX_UDP_PAYLOAD))


class Record(NamedTuple):
    """One resource record of a peeked response. Names are their uncompressed wire form, lower-cased: equal
    exactly when dnspython's names are equal."""

    owner: bytes
    rdtype: int
    ttl: int
    value: object  # A, AAAA: the address as text; CNAME: the target's name; SOA: its MINIMUM field


class ResponsePeek(NamedTuple):
    """What the miss path needs of an upstream response, read by ``peek_response`` without dnspython."""

    id: int
    flags: int  # the header's second word: QR, opcode, AA, TC, RD, RA, Z, AD, CD and the rcode
    key: Key
    question: str  # the question's name as text, as the response wrote it (what dnspython's to_text gives)
    qname: bytes  # ... and as wire bytes
    records_end: int  # where the records before the OPT record end
    counts: tuple[int, int, int]  # records in the answer, authority and additional sections, OPT not counted
    answer: tuple[Record, ...]
    authority: tuple[Record, ...]


@functools.lru_cache(maxsize=64)
def peek_response(wire: bytes) -> ResponsePeek | None:
    """The usual shape of a response read fast: QR set, opcode QUERY, one plain question (as peek_query's), then
    only IN records of types A, AAAA, CNAME and SOA, each set of records with the same owner and type together,
    with one TTL and no rdata twice (a CNAME or SOA alone), and at most one OPT record, last, version 0, with
    no extended rcode and no options; nothing after. None for anything else. Cached: an answer is checked, its
    TTL read, its addresses learnt and its reply written, one after the other."""
    if len(wire) < HEADER_SIZE:
        return None
    id_, flags, questions, answers, authorities, additionals = HEADER.unpack_from(wire)
    if not flags & _QR or flags & _OPCODE or questions != 1:
        return None
    question = _plain_question(wire)
    if question is None:
        return None
    qname, key, offset = question
    sections: tuple[list[Record], list[Record], list[Record]] = ([], [], [])
    records_end = None
    sets_seen: set[tuple[int, bytes, int]] = set()
    this_set, values = None, set()  # the set of records being read, and its rdata so far
    for section, count in enumerate((answers, authorities, additionals)):
        for _ in range(count):
            if records_end is not None:
                return None  # a record after OPT
            start = offset
            read = _read_name(wire, offset, len(wire))
            if read is None or read[1] + _RECORD.size > len(wire):
                return None
            owner, offset = read
            rdtype, rdclass, ttl, size = _RECORD.unpack_from(wire, offset)
            offset += _RECORD.size
            end = offset + size
            if end > len(wire):
                return None
            if rdtype == _OPT_TYPE:
                # Its class is the payload; its TTL field holds the extended rcode, the version and the flags.
                if section != 2 or owner != b"\0" or ttl >> 16 or size:
                    return None
                records_end, offset = start, end
                continue
            value = _rdata(wire, offset, end, rdtype) if rdclass == _IN else None
            if value is None or ttl > MAX_TTL:
                return None  # dnspython reads such a TTL as 0
            if (section, owner, rdtype) != this_set:
                this_set, values = (section, owner, rdtype), set()
                if this_set in sets_seen:
                    return None  # dnspython would move it to the rest of its set
                sets_seen.add(this_set)
            elif rdtype in (_CNAME, _SOA) or ttl != sections[section][-1].ttl or value in values:
                return None  # dnspython would keep one CNAME or SOA, one TTL per set, and each rdata once
            values.add(value)
            sections[section].append(Record(owner, rdtype, ttl, value))
            offset = end
    if offset != len(wire):
        return None
    return ResponsePeek(
        id=id_,
        flags=flags,
        key=key,
        question=_plain_name_text(qname),  # plain: read as its lowered twin was
        qname=qname,
        records_end=offset if records_end is None else records_end,
        counts=(answers, authorities, additionals - (records_end is not None)),
        answer=tuple(sections[0]),
        authority=tuple(sections[1]),
    )


def _rdata(wire: bytes, offset: int, end: int, rdtype: int) -> object | None:
    """The value of an A, AAAA, CNAME or SOA record's rdata (see Record), when it fills ``offset``:``end`` exactly."""
    if rdtype == _A:
        return socket.inet_ntop(socket.AF_INET, wire[offset:end]) if end - offset == 4 else None
    if rdtype == _AAAA:
        return socket.inet_ntop(socket.AF_INET6, wire[offset:end]) if end - offset == 16 else None
    if rdtype == _CNAME:
        read = _read_name(wire, offset, end)
        return read[0] if read is not None and read[1] == end else None
    if rdtype == _SOA:
        mname = _read_name(wire, offset, end)
        rname = _read_name(wire, mname[1], end) if mname is not None else None
        if rname is None or rname[1] + _SOA_NUMBERS != end:
            return None
        return int.from_bytes(wire[end - 4 : end], "big")
    return None


def _read_name(wire: bytes, offset: int, limit: int) -> tuple[bytes, int] | None:
    """The name at ``offset`` (compression pointers followed, as dnspython does: each further back than the
    last), lower-cased and uncompressed, and where it ends; None if it is not one or reads past ``limit``."""
    parts, end, furthest_back = [], None, offset
    while True:
        if offset >= limit:
            return None
        length = wire[offset]
        if length == 0:
            parts.append(b"\0")
            offset += 1
            break
        if length < 64:
            if offset + 1 + length > limit:
                return None
            parts.append(wire[offset : offset + 1 + length].lower())
            offset += 1 + length
        elif length >= 0xC0:
            if offset + 2 > limit:
                return None
            target = (length & 0x3F) << 8 | wire[offset + 1]
            if target >= furthest_back:
                return None
            if end is None:
                end = offset + 2
            offset = furthest_back = target
        else:
            return None  # label types 0x40 and 0x80: none in use
    name = b"".join(parts)
    if len(name) > MAX_NAME:
        return None
    return name, offset if end is None else end
