"""DnsHits (relay.fastpath): cache hits answered a batch at a time, over real UDP sockets on loopback, by both
twins. Each answer must be the one the Python hot path renders (ReplyTemplate.render) for the same query and
time, and everything else must come back whole to Python."""

import socket
import struct

import dns.flags
import dns.message
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import _fastpath_py
from relay.dns.cache import Cache
from relay.dns.wire import peek_query
from tests.conftest import _fastpath_c
from tests.dns.support import mangled, response
from tests.dns.test_hot_path import cached_responses, cookie, queries

LOOPBACK = (socket.inet_aton("127.0.0.0"), 8)
STORED_AT = 1000.0


class Pair:
    """A non-blocking server socket (what the table reads) and a client socket that sends to it."""

    def __init__(self):
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(2)

    def send(self, *wires: bytes) -> None:
        for wire in wires:
            self.client.sendto(wire, self.server.getsockname())

    def replies(self, count: int) -> list[bytes]:
        return [self.client.recv(65535) for _ in range(count)]

    def close(self):
        self.server.close()
        self.client.close()


@pytest.fixture
def pair():
    made = Pair()
    yield made
    made.close()


def install(hits, cache: Cache, wire: bytes, token=None) -> bool:
    """Put the template the Python hot path would render ``wire``'s answer from, as relay.dns.service does."""
    peek = peek_query(wire)
    template, _ = cache.hit(peek)
    stored_at, lifetime = cache.times(peek.key)
    return hits.put(
        peek.qname.lower(), peek.key[1], peek.key[2], peek.edns, template.wire, template.ttl_offsets, template.ttls,
        stored_at, lifetime, token if token is not None else peek.key, cache.now(),
    )  # fmt: skip


def cache_with(name: str, rdtype: str, cached: bytes, now: list) -> Cache:
    cache = Cache(100, 0, 86400, clock=lambda: now[0])
    cache.put((name.lower(), dns.rdatatype.from_text(rdtype), 1), cached)
    return cache


def one_record(name: str, ttl: int, now: list) -> Cache:
    return cache_with(name, "A", response(name, answer=[(name, ttl, "A", "192.0.2.1")]), now)


def a_query(name="www.example.com.", rdtype="A", *, id_=0x4242, edns=False) -> bytes:
    made = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, id=id_)
    return made.to_wire()


def table_with_one_answer(impl, token=None, capacity=4):
    """A table holding the answer of cached_responses()[0] to a plain query, its cache and that query."""
    now = [STORED_AT]
    name, rdtype, cached = cached_responses()[0]
    cache = cache_with(name, rdtype, cached, now)
    hits = impl.DnsHits(capacity, [LOOPBACK])
    wire = a_query()
    assert install(hits, cache, wire, token=token)
    return hits, cache, wire


def test_a_hit_is_answered_as_the_python_hot_path_renders_it_and_a_miss_comes_back_whole(impl, pair):
    now = [STORED_AT]
    name, rdtype, cached = cached_responses()[0]
    cache = cache_with(name, rdtype, cached, now)
    hits = impl.DnsHits(16, [LOOPBACK])
    hit = a_query("WWW.example.COM.", id_=7)
    assert install(hits, cache, hit)
    now[0] += 12.5
    other = a_query("other.example.com.", id_=8)
    pair.send(hit, other)
    received, left, unsent, told, counts = hits.answer(pair.server.fileno(), now[0])
    assert received == 2 and unsent == []
    assert left == [(other, pair.client.getsockname())]
    assert counts == {dns.rdatatype.A: 1}
    assert told == [("127.0.0.1", (name, dns.rdatatype.A, 1))]
    template, ttl_of = cache.hit(peek_query(hit))
    reply = pair.replies(1)[0]
    assert reply == template.render(peek_query(hit), ttl_of)
    assert struct.unpack_from("!H", reply)[0] == 7 and reply[12:29] == hit[12:29]  # its ID, its casing
    assert dns.message.from_wire(reply).answer[0].ttl == 300 - 13


def test_nothing_waiting_is_blocking_io_error(impl, pair):
    hits = impl.DnsHits(4, [LOOPBACK])
    with pytest.raises(BlockingIOError):
        hits.answer(pair.server.fileno(), 0.0)


def test_clients_outside_the_networks_stale_entries_and_replies_too_big_for_udp_are_left(impl, pair):
    now = [STORED_AT]
    big = response(answer=[("www.example.com.", 300, "A", f"192.0.2.{i}") for i in range(1, 40)])
    cache = cache_with("www.example.com.", "A", big, now)
    hits = impl.DnsHits(4, [(socket.inet_aton("10.0.0.0"), 8)])
    plain, with_edns = a_query(), a_query(edns=True)
    assert install(hits, cache, plain) and install(hits, cache, with_edns)
    pair.send(with_edns)  # from 127.0.0.1: not allowed
    assert hits.answer(pair.server.fileno(), now[0])[1] == [(with_edns, pair.client.getsockname())]
    hits.allow([LOOPBACK])
    pair.send(plain, with_edns)  # 39 records do not fit 512 bytes; with EDNS (1232) they do
    received, left, *_ = hits.answer(pair.server.fileno(), now[0])
    assert received == 2 and left == [(plain, pair.client.getsockname())]
    assert len(pair.replies(1)[0]) > 512
    pair.send(with_edns)
    assert hits.answer(pair.server.fileno(), now[0] + 300)[1] == [(with_edns, pair.client.getsockname())]  # stale


def test_a_client_is_told_once_per_ten_seconds_per_entry_and_again_for_a_new_one(impl, pair):
    hits, cache, wire = table_with_one_answer(impl, "first")
    told = []
    for moment in (0.0, 3.0, 9.9, 10.0, 15.0, 22.0):
        pair.send(wire)
        told.append(hits.answer(pair.server.fileno(), STORED_AT + moment)[3])
    assert told == [[("127.0.0.1", "first")], [], [], [("127.0.0.1", "first")], [], [("127.0.0.1", "first")]]
    install(hits, cache, wire, token="second")  # the same question again: a new entry
    pair.send(wire)
    assert hits.answer(pair.server.fileno(), STORED_AT + 22.5)[3] == [("127.0.0.1", "second")]
    pair.replies(7)


def colliding_clients(count: int, slot: int = 0) -> list[str]:
    """Loopback addresses whose (client, entry ``slot``) pairs share one set of the told table."""
    sets: dict[int, list[str]] = {}
    for number in range(2, 1 << 16):
        address = f"127.0.{number >> 8}.{number & 0xFF}"
        client = int.from_bytes(socket.inet_aton(address), "big")
        mixed = ((client ^ (slot * 0x9E3779B9 & 0xFFFFFFFF)) * 2654435761) & 0xFFFFFFFF
        found = sets.setdefault(mixed >> (32 - _fastpath_py._TOLD_SET_BITS), [])
        found.append(address)
        if len(found) == count:
            return found
    raise AssertionError("no such addresses")


def test_a_full_set_of_told_pairs_gives_up_the_one_told_longest_ago(impl, pair):
    hits, _, wire = table_with_one_answer(impl, "entry")
    clients = colliding_clients(5)
    told = []
    for moment, address in enumerate([*clients, clients[1], clients[0], clients[1], clients[2]]):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind((address, 0))
            client.sendto(wire, pair.server.getsockname())
            told.append(len(hits.answer(pair.server.fileno(), STORED_AT + moment * 0.01)[3]))
    # Five clients in a set of four ways: the fifth takes the place of the first, told longest ago; the second,
    # back, is still there (and not told again); the first, back, takes the place of the second, told before
    # the third and the fourth; and so on.
    assert told == [1, 1, 1, 1, 1, 0, 1, 1, 1]


def test_forget_clear_and_a_full_table(impl, pair):
    now = [STORED_AT]
    hits = impl.DnsHits(2, [LOOPBACK])
    wires = [a_query(f"n{i}.example.com.") for i in range(3)]
    caches = [one_record(f"n{i}.example.com.", 60 * (i + 1), now) for i in range(3)]
    assert install(hits, caches[0], wires[0]) and install(hits, caches[1], wires[1])
    assert not install(hits, caches[2], wires[2]) and len(hits) == 2  # both fresh: no room
    now[0] += 61  # n0's answer (60 s) is stale now: its place is taken, though the new one was stored before
    assert install(hits, caches[2], wires[2]) and len(hits) == 2
    hits.forget(b"\x02n1\x07example\x03com\x00", dns.rdatatype.A, 1)
    pair.send(wires[1], wires[2])
    received, left, *_ = hits.answer(pair.server.fileno(), now[0])
    assert received == 2 and left == [(wires[1], pair.client.getsockname())]
    hits.clear()
    assert len(hits) == 0
    pair.send(wires[2])
    assert hits.answer(pair.server.fileno(), now[0])[1] == [(wires[2], pair.client.getsockname())]


@pytest.mark.parametrize(
    ("offsets", "ttls", "error"),
    [([38], [60], ValueError), ([12], [-1], ValueError), ([12], [2**32], ValueError), ([12], [None], TypeError),
     ([12.0], [60], TypeError), ([12, 16], [60, 1.5], TypeError)],
    ids=["offset-past-the-end", "negative-ttl", "ttl-past-32-bits", "no-ttl", "float-offset", "float-ttl"],
)  # fmt: skip
def test_a_bad_template_is_refused_and_leaves_the_table_as_it_was(impl, pair, offsets, ttls, error):
    hits, _, wire = table_with_one_answer(impl, capacity=1)
    with pytest.raises(error):
        hits.put(b"\x01x\x00", 1, 1, False, b"\x00" * 20, offsets, ttls, 0.0, 60.0, None, 0.0)
    with pytest.raises(error):  # the same question as the entry: it stays
        hits.put(peek_query(wire).qname.lower(), 1, 1, False, b"\x00" * 40, offsets, ttls, 0.0, 60.0, None, 0.0)
    assert len(hits) == 1
    pair.send(wire)
    assert hits.answer(pair.server.fileno(), STORED_AT)[:2] == (1, [])


def test_a_full_table_looks_at_a_bounded_number_of_entries_per_put_and_goes_on_from_there(impl):
    hits = impl.DnsHits(100)
    wire = b"\x00" * 12 + b"\x01x\x00" + b"\x00" * 9
    for number in range(100):  # slot 99, the last filled, is fresh for 1 s only
        assert hits.put(
            b"\x02%02d\x00" % number, 1, 1, False, wire, [], [], 0.0, 1.0 if number == 99 else 60.0, None, 0.0
        )
    assert not hits.put(b"\x03new\x00", 1, 1, False, wire, [], [], 5.0, 60.0, None, 5.0)  # slots 1-64: all fresh
    assert hits.put(b"\x03new\x00", 1, 1, False, wire, [], [], 5.0, 60.0, None, 5.0)  # from 65 on: 99 is stale
    assert len(hits) == 100


def test_bad_tables_and_networks_are_refused(impl):
    for capacity in (0, 1 << 23):
        with pytest.raises(ValueError):
            impl.DnsHits(capacity)
    hits = impl.DnsHits(2)
    for networks in ([(b"\x0a\x00\x00", 8)], [(b"\x0a\x00\x00\x00", 33)], [(bytes(16), 64)]):
        with pytest.raises(ValueError):
            hits.allow(networks)
    hits.allow(network for network in [LOOPBACK])  # any iterable


def test_untell_makes_the_next_answer_told_again(impl, pair):
    hits, _, wire = table_with_one_answer(impl, "entry")
    told = []
    for moment, untell in ((0.0, None), (1.0, None), (2.0, "127.0.0.2"), (3.0, "127.0.0.1"), (4.0, None)):
        if untell is not None:
            hits.untell(untell, peek_query(wire).qname.lower(), dns.rdatatype.A, 1)
        pair.send(wire)
        told.append(len(hits.answer(pair.server.fileno(), STORED_AT + moment)[3]))
    hits.untell("::1", b"\x01x\x00", 1, 1)  # neither an IPv4 client nor an entry: nothing to do
    assert told == [1, 0, 0, 1, 0]  # another client untold changes nothing for this one
    pair.replies(5)


@st.composite
def asked(draw, which: int) -> bytes:
    """The cached question as clients ask it: any casing, ID, flags, EDNS payload and cookie, then perhaps
    mangled (junk after it, cut, a bit flipped, a count off)."""
    name, rdtype, _ = cached_responses()[which]
    casing = draw(st.integers(0, 2**31))
    spelled = "".join(c.upper() if casing >> (i % 31) & 1 else c for i, c in enumerate(name))
    edns = draw(st.booleans())
    options = [cookie(draw(st.sampled_from([8, 16, 40, 12])))] if edns and draw(st.booleans()) else None
    made = dns.message.make_query(
        spelled, rdtype, use_edns=0 if edns else False, payload=draw(st.integers(0, 65535)), options=options,
        id=draw(st.integers(0, 0xFFFF)),
    )  # fmt: skip
    made.flags = dns.flags.Flag(draw(st.integers(0, 0xFFFF)) & ~0x7800)
    return mangled(draw, made.to_wire(), ["none", "none", "none", "junk", "cut", "flip", "count"])


@pytest.mark.skipif(_fastpath_c is None, reason="compares the extension with the twin")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    which=st.integers(0, 3),
    elapsed=st.one_of(st.floats(0, 19), st.floats(0, 400)),
    limit=st.integers(1, 8),
)
def test_both_twins_answer_and_leave_alike_and_as_the_hot_path(data, which, elapsed, limit):
    """Whatever clients send (queries of every shape, junk, cuts), for a template of one question under both
    casings and EDNS: the same datagrams answered, with the hot path's bytes, and the rest left whole."""
    wires = data.draw(st.lists(st.one_of(asked(which), asked(which), queries()), min_size=1, max_size=6))
    name, rdtype, cached = cached_responses()[which]
    now = [STORED_AT]
    cache = cache_with(name, rdtype, cached, now)
    tables = [twin.DnsHits(8, [LOOPBACK]) for twin in (_fastpath_c, _fastpath_py)]
    for edns in (False, True):
        options = [cookie(8)] if edns else None
        wire = dns.message.make_query(name, rdtype, use_edns=0 if edns else False, options=options).to_wire()
        for table in tables:
            install(table, cache, wire)
    now[0] += elapsed
    outcomes, answered = [], []
    for table in tables:
        pair = Pair()
        try:
            pair.send(*wires)
            results, left_all, replies = [], [], 0
            while True:
                try:
                    received, left, unsent, told, counts = table.answer(pair.server.fileno(), now[0], limit)
                except BlockingIOError:
                    break
                assert unsent == []
                replies += received - len(left)
                left_all += [wire for wire, _ in left]
                results.append((received, len(left), [token for _, token in told], counts))
            outcomes.append((results, left_all))
            answered.append(pair.replies(replies))
        finally:
            pair.close()
    assert outcomes[0] == outcomes[1] and answered[0] == answered[1]
    expected = []
    for wire in wires:
        peek = peek_query(wire)
        hit = cache.hit(peek) if peek is not None else None
        if hit is not None and len(hit[0].wire) <= peek.udp_limit:
            expected.append(hit[0].render(peek, hit[1]))
        else:
            assert wire in outcomes[0][1]
    assert answered[0] == expected


TINY = bytes(64)  # a template the questions below fit


def names_one_unseeded_bucket(count: int, buckets_mask: int = 0xFFFF) -> list[bytes]:
    """Names (wire form) on which 32-bit FNV-1a without a seed agrees in its low bits, as a client could choose
    them against such a table: a random six-letter start, then the two letters that lead to one bucket."""
    prime, letters = 16777619, b"abcdefghijklmnopqrstuvwxyz0123456789"
    inverse, target = pow(prime, -1, buckets_mask + 1), 0x1234
    wanted = {}  # the state after six letters -> the two letters that take it to the target
    for seventh in letters:
        for eighth in letters:
            before = ((((target * inverse) & buckets_mask) ^ eighth) * inverse & buckets_mask) ^ seventh
            wanted.setdefault(before, bytes((seventh, eighth)))
    state_after = {}
    for number in range(len(letters) ** 6):
        start = bytes(letters[number // len(letters) ** power % len(letters)] for power in range(6))
        state = 2166136261
        for octet in b"\x08" + start:
            state = ((state ^ octet) * prime) & 0xFFFFFFFF
        if state & buckets_mask in wanted and start not in state_after:
            state_after[start] = wanted[state & buckets_mask]
            if len(state_after) == count:
                break
    return [b"\x08" + start + end + b"\x07example\x03com\x00" for start, end in state_after.items()]


def test_names_chosen_to_share_a_bucket_of_an_unseeded_hash_spread(impl):
    names = names_one_unseeded_bucket(300)
    hits = impl.DnsHits(20000)  # 65536 buckets
    for name in names:
        assert hits.put(name, 1, 1, False, TINY, [], [], 0.0, 60.0, None, 0.0)
    assert len(hits) == 300 and hits.longest_chain() <= 8  # all 300 in one chain without the table's seed


class Finalizer:
    """A token whose release puts another entry in the table: the table must be whole when it runs."""

    def __init__(self, hits, results: list):
        self.hits, self.results = hits, results

    def __del__(self):
        self.results.append(self.hits.put(b"\x01b\x00", 1, 1, False, TINY, [], [], 0.0, 60.0, None, 0.0))


@pytest.mark.parametrize("how", ["replaced", "forgotten", "cleared"])
def test_a_token_released_by_the_table_may_use_the_table(impl, how):
    hits, results = impl.DnsHits(1), []
    assert hits.put(b"\x01a\x00", 1, 1, False, TINY, [], [], 0.0, 60.0, Finalizer(hits, results), 0.0)
    if how == "replaced":
        assert hits.put(b"\x01a\x00", 1, 1, False, TINY, [], [], 0.0, 60.0, None, 0.0)
        assert results == [False]  # the new a fills the table: no room for b
    elif how == "forgotten":
        hits.forget(b"\x01a\x00", 1, 1)
        assert results == [True]
    else:
        hits.clear()
        assert results == [True]
    assert len(hits) == 1 == hits.longest_chain()


def test_untell_of_what_is_no_ipv4_address_does_nothing(impl, pair):
    hits, _, wire = table_with_one_answer(impl, "entry")
    pair.send(wire)
    assert len(hits.answer(pair.server.fileno(), STORED_AT)[3]) == 1
    qname = peek_query(wire).qname.lower()
    for client in ("127.0.0.1\x00junk", "127.0.0.1 ", "127.0.0.256", "é", ""):
        hits.untell(client, qname, dns.rdatatype.A, 1)
    pair.send(wire)
    assert hits.answer(pair.server.fileno(), STORED_AT + 1)[3] == []  # still told: nothing was untold
    pair.replies(2)
