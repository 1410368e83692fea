import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dns.message import (
    BadQuery,
    address_reply,
    parse_query,
    refused,
    reply_for,
    response_matches,
    servfail,
    truncated_for_udp,
    ttl_of,
    upstream_query,
)
from relay.dns.wire import EDNS_PAYLOAD, MAX_UDP_PAYLOAD
from tests.dns.support import KEY_A, big_response, nxdomain, positive, query, response, valid_queries, with_counts

# --- parse_query ---------------------------------------------------------------------------------------------------


def test_a_query_gives_its_id_key_limit_and_wire():
    wire = query(id=0xBEEF)
    parsed = parse_query(wire)
    assert (parsed.id, parsed.key, parsed.udp_limit, parsed.wire) == (0xBEEF, KEY_A, 512, wire)


def test_the_key_is_lower_cased_whatever_the_client_asked():
    assert parse_query(query("wWw.ExAmPlE.CoM")).key == KEY_A


def test_odd_octets_in_a_name_survive_the_key_text():
    name = dns.name.Name([b"A.b c\x00\xff", b"example", b""])
    key = parse_query(query(name)).key
    assert key[0] == "a\\.b\\032c\\000\\255.example."
    assert dns.name.from_text(key[0]) == name


@pytest.mark.parametrize(
    ("edns", "limit"),
    [
        ({}, 512),
        ({"use_edns": 0, "payload": 0}, 512),
        ({"use_edns": 0, "payload": 511}, 512),
        ({"use_edns": 0, "payload": 1232}, 1232),
        ({"use_edns": 0, "payload": MAX_UDP_PAYLOAD}, MAX_UDP_PAYLOAD),
        ({"use_edns": 0, "payload": 65535}, MAX_UDP_PAYLOAD),
    ],
)
def test_the_udp_limit_follows_edns_within_bounds(edns, limit):
    assert parse_query(query(**edns)).udp_limit == limit


def from_wire(reply: bytes) -> dns.message.Message:
    """dnspython before 2.4 (bookworm's 2.3) cannot read an unassigned opcode: it is read apart, as QUERY."""
    flags = int.from_bytes(reply[2:4], "big")
    message = dns.message.from_wire(reply[:2] + (flags & ~0x7800).to_bytes(2, "big") + reply[4:])
    message.flags = flags
    return message


def assert_header_reply(error: BadQuery, id: int, rcode: int):
    reply = from_wire(error.reply)
    assert reply.id == id
    assert reply.flags & dns.flags.QR
    assert reply.rcode() == rcode
    return reply


@pytest.mark.parametrize("wire", [b"", b"\x12", b"\x12\x34" + bytes(9)], ids=["empty", "1 byte", "11 bytes"])
def test_shorter_than_a_header_is_dropped(wire):
    with pytest.raises(BadQuery) as caught:
        parse_query(wire)
    assert caught.value.reply is None


def test_every_truncation_of_a_query_is_refused_with_formerr_once_the_header_is_there():
    wire = query(use_edns=0)
    for end in range(len(wire)):
        with pytest.raises(BadQuery) as caught:
            parse_query(wire[:end])
        if end < 12:
            assert caught.value.reply is None
        else:
            assert_header_reply(caught.value, 0x1234, dns.rcode.FORMERR)


def test_trailing_data_is_formerr():
    with pytest.raises(BadQuery) as caught:
        parse_query(query() + b"\x00")
    assert_header_reply(caught.value, 0x1234, dns.rcode.FORMERR)


def test_a_response_is_dropped_silently():
    with pytest.raises(BadQuery) as caught:
        parse_query(positive())
    assert caught.value.reply is None


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, 15])
def test_other_opcodes_are_not_implemented(opcode):
    message = dns.message.make_query("www.example.com.", "SOA", id=7)
    message.set_opcode(opcode)
    message.flags |= dns.flags.RD
    with pytest.raises(BadQuery) as caught:
        parse_query(message.to_wire())
    reply = assert_header_reply(caught.value, 7, dns.rcode.NOTIMP)
    assert (reply.flags >> 11) & 0xF == opcode
    assert reply.flags & dns.flags.RD
    assert not reply.question


@pytest.mark.parametrize("questions", [0, 2])
def test_one_question_exactly(questions):
    message = dns.message.make_query("www.example.com.", "A", id=9)
    if questions == 0:
        message.question = []
    else:
        message.question.append(dns.rrset.RRset(dns.name.from_text("other.example."), 1, 1))
    with pytest.raises(BadQuery) as caught:
        parse_query(message.to_wire())
    assert_header_reply(caught.value, 9, dns.rcode.FORMERR)


@pytest.mark.parametrize("section", ["answer", "authority"])
def test_a_query_carrying_records_is_formerr(section):
    message = dns.message.make_query("www.example.com.", "A", id=9)
    getattr(message, section).append(dns.rrset.from_text("www.example.com.", 1, "IN", "A", "192.0.2.1"))
    with pytest.raises(BadQuery) as caught:
        parse_query(message.to_wire())
    assert_header_reply(caught.value, 9, dns.rcode.FORMERR)


def test_opt_in_the_answer_section_is_formerr():
    wire = query(use_edns=0)
    with pytest.raises(BadQuery) as caught:
        parse_query(with_counts(wire, an=1, ar=0))
    assert_header_reply(caught.value, 0x1234, dns.rcode.FORMERR)


def test_two_opt_records_are_formerr():
    wire = query(use_edns=0)
    opt = wire[-11:]
    with pytest.raises(BadQuery) as caught:
        parse_query(with_counts(wire + opt, ar=2))
    assert_header_reply(caught.value, 0x1234, dns.rcode.FORMERR)


def test_edns_above_version_0_gets_badvers():
    with pytest.raises(BadQuery) as caught:
        parse_query(query(use_edns=1, payload=1232))
    reply = assert_header_reply(caught.value, 0x1234, dns.rcode.BADVERS)
    assert reply.edns == 0
    assert reply.question[0].name == dns.name.from_text("www.example.com.")


@pytest.mark.parametrize(
    "name",
    [b"\xc0\x0c", b"\x01a\xc0\x0c", b"\xc0\x0e\xc0\x0c", b"\xc0\xff", b"\x40a\x00", b"\x3fa"],
    ids=["pointer to itself", "loop through a label", "two pointers", "pointer past the end", "bad label type", "cut"],
)
def test_broken_names_are_formerr(name):
    wire = with_counts(b"\xab\xcd\x01\x00" + bytes(8), qd=1) + name + b"\x00\x01\x00\x01"
    with pytest.raises(BadQuery) as caught:
        parse_query(wire)
    assert_header_reply(caught.value, 0xABCD, dns.rcode.FORMERR)


def test_a_tsig_signed_query_is_formerr_we_hold_no_keys():
    message = dns.message.make_query("www.example.com.", "A", id=3)
    message.use_tsig(dns.tsigkeyring.from_text({"key.": "AAAAAAAAAAAAAAAAAAAAAA=="}))
    with pytest.raises(BadQuery) as caught:
        parse_query(message.to_wire())
    assert_header_reply(caught.value, 3, dns.rcode.FORMERR)


def assert_only_bad_query(wire: bytes):
    try:
        parsed = parse_query(wire)
    except BadQuery as error:
        if error.reply is not None:
            reply = from_wire(error.reply)
            assert reply.id == int.from_bytes(wire[:2], "big")
            assert reply.flags & dns.flags.QR
    else:
        assert parsed.wire == wire


@settings(max_examples=2000)
@given(st.binary(max_size=600))
def test_random_bytes_raise_nothing_but_bad_query(wire):
    assert_only_bad_query(wire)


@settings(max_examples=2000)
@given(valid_queries(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_queries_raise_nothing_but_bad_query(wire, corruptions):
    damaged = bytearray(wire)
    for position, value in corruptions:
        damaged[position % len(damaged)] = value
    assert_only_bad_query(bytes(damaged))


@given(valid_queries())
def test_every_valid_query_parses(wire):
    parsed = parse_query(wire)
    assert parsed.id == int.from_bytes(wire[:2], "big")
    assert 512 <= parsed.udp_limit <= MAX_UDP_PAYLOAD


# --- replies -------------------------------------------------------------------------------------------------------


def assert_addressed_to(reply_wire: bytes, query_wire: bytes):
    reply, asked = dns.message.from_wire(reply_wire), dns.message.from_wire(query_wire)
    assert reply.id == asked.id
    assert reply.flags & dns.flags.QR
    assert len(reply.question) == 1
    # The same octets, case included (0x20): Name equality alone ignores case.
    assert reply.question[0].name.to_wire() == asked.question[0].name.to_wire()
    assert (reply.question[0].rdtype, reply.question[0].rdclass) == (
        asked.question[0].rdtype,
        asked.question[0].rdclass,
    )
    copied = dns.flags.RD | dns.flags.CD
    assert reply.flags & copied == asked.flags & copied
    assert (reply.edns >= 0) == (asked.edns >= 0)
    return reply


@given(valid_queries(), st.sampled_from([positive(), nxdomain(), response(rcode=dns.rcode.SERVFAIL), b"garbage"]))
def test_every_reply_carries_the_query_id_and_question(wire, upstream):
    parsed = parse_query(wire)
    assert dns.message.from_wire(refused(parsed)).rcode() == dns.rcode.REFUSED
    assert dns.message.from_wire(servfail(parsed)).rcode() == dns.rcode.SERVFAIL
    for reply in (refused(parsed), servfail(parsed), reply_for(parsed, upstream)):
        assert_addressed_to(reply, wire)


def test_servfail_offers_recursion_refused_does_not():
    parsed = parse_query(query())
    assert dns.message.from_wire(servfail(parsed)).flags & dns.flags.RA
    assert not dns.message.from_wire(refused(parsed)).flags & dns.flags.RA


def test_reply_for_keeps_the_records_and_the_asked_casing():
    parsed = parse_query(query("WWW.example.COM", id=0x4321))
    reply = assert_addressed_to(reply_for(parsed, positive(id=0x9999)), parsed.wire)
    assert reply.question[0].name.to_text() == "WWW.example.COM."
    assert reply.answer == [dns.rrset.from_text("www.example.com.", 300, "IN", "A", "192.0.2.1")]


@pytest.mark.parametrize("rdtype,address", [("A", "198.18.0.7"), ("AAAA", "fc00::7")])
def test_an_address_reply_holds_one_record_for_the_name_as_asked(rdtype, address):
    parsed = parse_query(query("Www.Example.com", rdtype, id=0x4321, use_edns=0))
    reply = assert_addressed_to(address_reply(parsed, address, 1), parsed.wire)
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.RA
    assert reply.answer == [dns.rrset.from_text("Www.Example.com.", 1, "IN", rdtype, address)]
    assert str(reply.answer[0].name) == "Www.Example.com."


def test_reply_for_a_client_without_edns_has_no_opt():
    reply = dns.message.from_wire(reply_for(parse_query(query()), positive(use_edns=0)))
    assert reply.edns == -1


def test_reply_for_an_edns_client_has_our_opt_without_upstream_options():
    upstream = dns.message.from_wire(positive(use_edns=0))
    upstream.use_edns(0, payload=4096, options=[dns.edns.GenericOption(dns.edns.NSID, b"upstream-7")])
    reply = dns.message.from_wire(reply_for(parse_query(query(use_edns=0)), upstream.to_wire()))
    assert (reply.edns, reply.payload, reply.options) == (0, EDNS_PAYLOAD, ())


def test_an_extended_rcode_reaches_edns_clients_and_is_servfail_to_others():
    upstream = response(rcode=dns.rcode.BADCOOKIE, use_edns=0)
    with_edns = dns.message.from_wire(reply_for(parse_query(query(use_edns=0)), upstream))
    without = dns.message.from_wire(reply_for(parse_query(query()), upstream))
    assert (with_edns.rcode(), without.rcode()) == (dns.rcode.BADCOOKIE, dns.rcode.SERVFAIL)


def test_an_unreadable_upstream_response_becomes_servfail():
    reply = dns.message.from_wire(reply_for(parse_query(query()), positive()[:-3]))
    assert reply.rcode() == dns.rcode.SERVFAIL


# --- truncated_for_udp ---------------------------------------------------------------------------------------------


def big_reply(records: int, **edns) -> bytes:
    answer = [("www.example.com.", 60, "A", f"192.0.2.{i}") for i in range(records)]
    return reply_for(parse_query(query(**edns)), response(answer=answer))


def test_a_reply_that_fits_is_unchanged():
    reply = big_reply(5)
    assert truncated_for_udp(reply, 512) is reply


def test_a_reply_too_long_keeps_header_and_question_with_tc():
    reply = big_reply(40, use_edns=0, payload=4096)
    assert len(reply) > 512
    cut = dns.message.from_wire(truncated_for_udp(reply, 512))
    assert cut.flags & dns.flags.TC
    assert (cut.answer, cut.authority, cut.additional) == ([], [], [])
    assert cut.edns == 0  # the client spoke EDNS: the reply says so still
    assert_addressed_to(truncated_for_udp(reply, 512), query(use_edns=0, payload=4096))


def test_a_long_unreadable_reply_is_not_sent():
    assert truncated_for_udp(b"\x00" * 600, 512) == b""


@given(st.integers(0, 150), st.integers(512, 2000), st.booleans())
def test_truncation_never_exceeds_the_limit_and_sets_tc_when_it_cut(records, limit, edns):
    reply = big_reply(records, **({"use_edns": 0} if edns else {}))
    out = truncated_for_udp(reply, limit)
    assert len(out) <= limit
    if out != reply:
        assert dns.message.from_wire(out).flags & dns.flags.TC


@given(st.binary(min_size=0, max_size=1000), st.integers(512, 700))
def test_truncating_garbage_stays_within_the_limit(wire, limit):
    assert len(truncated_for_udp(wire, limit)) <= limit


# --- upstream side -------------------------------------------------------------------------------------------------


def test_the_upstream_query_asks_recursion_with_edns0_1232_and_no_options():
    message = dns.message.from_wire(upstream_query(KEY_A, id=77))
    assert message.id == 77
    assert message.flags & dns.flags.RD and not message.flags & dns.flags.QR
    assert (message.edns, message.payload, message.options) == (0, 1232, ())
    question = message.question[0]
    assert (question.name.to_text(), question.rdtype, question.rdclass) == KEY_A


@given(valid_queries())
def test_the_upstream_query_asks_what_the_client_asked(wire):
    key = parse_query(wire).key
    assert response_matches(key, 5, reply_for(parse_query(upstream_query(key, id=5)), positive()))


def test_a_matching_response_matches_whatever_its_casing():
    assert response_matches(KEY_A, 0x1234, positive(name="WWW.Example.com."))


@pytest.mark.parametrize(
    "wire",
    [
        positive(id=0x1235),
        query(),
        positive(name="www.example.org."),
        response(rdtype="AAAA"),
        positive()[:-2],
        b"",
        with_counts(positive(), qd=0),
        positive()[:2] + bytes([positive()[2] | 3 << 3]) + positive()[3:],  # bookworm's dnspython cannot name it
    ],
    ids=["other id", "a query", "other name", "other type", "truncated", "empty", "no question", "opcode 3"],
)
def test_anything_else_does_not_match(wire):
    assert not response_matches(KEY_A, 0x1234, wire)


def test_a_response_with_another_class_does_not_match():
    assert not response_matches(("www.example.com.", dns.rdatatype.A, dns.rdataclass.CH), 0x1234, positive())


@settings(max_examples=1000)
@given(st.binary(max_size=600))
def test_response_matches_and_ttl_of_take_any_bytes(wire):
    assert response_matches(KEY_A, 0x1234, wire) in (True, False)
    ttl = ttl_of(wire)
    assert ttl is None or ttl >= 0


# --- ttl_of --------------------------------------------------------------------------------------------------------

SOA_1H = ("example.com.", 3600, "SOA", "ns.example.com. hostmaster.example.com. 1 7200 900 1209600 300")


@pytest.mark.parametrize(
    ("wire", "ttl"),
    [
        (positive(ttl=300), 300),
        (
            response(answer=[("www.example.com.", 300, "A", "192.0.2.1"), ("www.example.com.", 60, "A", "192.0.2.2")]),
            60,
        ),
        (
            response(
                answer=[
                    ("www.example.com.", 500, "CNAME", "web.example.com."),
                    ("web.example.com.", 90, "A", "192.0.2.1"),
                ]
            ),
            90,
        ),
        (nxdomain(soa_ttl=900, minimum=600), 600),
        (nxdomain(soa_ttl=120, minimum=600), 120),
        (response(authority=[SOA_1H]), 300),
        (response(answer=[("www.example.com.", 100, "CNAME", "web.example.com.")], authority=[SOA_1H]), 100),
        (response(rdtype="CNAME", answer=[("www.example.com.", 100, "CNAME", "web.example.com.")]), 100),
        (positive(ttl=0), 0),
    ],
    ids=[
        "positive",
        "lowest of the answer",
        "cname chain",
        "nxdomain: soa minimum",
        "nxdomain: soa ttl",
        "nodata",
        "cname to nodata",
        "cname asked",
        "ttl 0",
    ],
)
def test_how_long_a_response_may_be_cached(wire, ttl):
    assert ttl_of(wire) == ttl


@pytest.mark.parametrize(
    "wire",
    [
        response(rcode=dns.rcode.NXDOMAIN),
        response(),
        response(answer=[("www.example.com.", 100, "CNAME", "web.example.com.")]),
        response(rcode=dns.rcode.SERVFAIL),
        response(rcode=dns.rcode.REFUSED),
        response(rcode=dns.rcode.FORMERR),
        positive(flags=dns.flags.TC),
        positive()[:-1],
        with_counts(positive(), qd=0),
    ],
    ids=[
        "nxdomain without soa",
        "nodata without soa",
        "cname to nodata without soa",
        "servfail",
        "refused",
        "formerr",
        "truncated",
        "unreadable",
        "no question",
    ],
)
def test_what_is_not_cached(wire):
    assert ttl_of(wire) is None


def test_an_answer_larger_than_any_edns_payload_is_readdressed_whole():
    """dnspython would cap the re-encoded message at its OPT's payload; truncating is truncated_for_udp's job."""
    big = big_response()
    reply = dns.message.from_wire(reply_for(parse_query(query(use_edns=0)), big))
    assert reply.rcode() == dns.rcode.NOERROR and len(reply.answer[0]) == 200
