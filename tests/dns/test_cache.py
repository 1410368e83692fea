import dns.flags
import dns.message
import dns.rcode
import pytest

from relay.dns.cache import MAX_RESPONSE, STALE_TTL, Cache
from tests.dns.support import KEY_A, SOA, big_response, nxdomain, positive, response, ttls

KEY_B = ("b.example.", 1, 1)
KEY_C = ("c.example.", 1, 1)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def make_cache(clock, max_entries=100, min_ttl=0, max_ttl=86400, stale_for=3600):
    return Cache(max_entries, min_ttl, max_ttl, stale_for=stale_for, clock=clock)


FULL = response(
    answer=[("www.example.com.", 300, "A", "192.0.2.1")],
    authority=[("example.com.", 600, "NS", "ns.example.com.")],
    additional=[("ns.example.com.", 900, "A", "192.0.2.53")],
    use_edns=0,
)


def test_a_miss_is_none(clock):
    assert make_cache(clock).get(KEY_A) is None


def test_a_fresh_hit_has_every_ttl_lowered_to_the_time_left(clock):
    cache = make_cache(clock)
    cache.put(KEY_A, FULL)  # kept 300 s, the answer's TTL: the longer NS and glue TTLs are capped to it
    clock.now += 100.5
    wire, fresh = cache.get(KEY_A)
    assert fresh
    # 199.5 s left, rounded down: a client never keeps a record past our own expiry.
    assert ttls(wire) == {"answer": [199], "authority": [199], "additional": [199]}
    assert dns.message.from_wire(wire).edns == 0  # OPT is kept, not aged


def test_ttls_are_capped_at_the_time_the_cache_keeps_the_entry(clock):
    cache = make_cache(clock, max_ttl=60)
    cache.put(KEY_A, positive(ttl=3600))
    clock.now += 10
    assert ttls(cache.get(KEY_A)[0])["answer"] == [50]


def test_a_negative_answer_ages_its_soa(clock):
    cache = make_cache(clock)
    cache.put(KEY_A, nxdomain(soa_ttl=900, minimum=600))  # kept 600 s: min(SOA TTL, MINIMUM)
    clock.now += 100
    wire, fresh = cache.get(KEY_A)
    assert fresh and dns.message.from_wire(wire).rcode() == dns.rcode.NXDOMAIN
    assert ttls(wire)["authority"] == [500]


def test_min_ttl_keeps_an_entry_longer_with_ttls_never_below_zero(clock):
    cache = make_cache(clock, min_ttl=60)
    cache.put(KEY_A, positive(ttl=5))
    clock.now += 30
    wire, fresh = cache.get(KEY_A)
    assert fresh and ttls(wire)["answer"] == [0]


def test_after_expiry_it_is_stale_with_the_stale_ttl_then_dropped(clock):
    cache = make_cache(clock, stale_for=3600)
    cache.put(KEY_A, FULL)
    clock.now += 300
    wire, fresh = cache.get(KEY_A)
    assert not fresh
    assert ttls(wire) == {"answer": [STALE_TTL], "authority": [STALE_TTL], "additional": [STALE_TTL]}
    clock.now += 3599
    assert cache.get(KEY_A)[1] is False
    clock.now += 1
    assert cache.get(KEY_A) is None
    assert len(cache) == 0


@pytest.mark.parametrize(
    "wire",
    [
        response(rcode=dns.rcode.SERVFAIL),
        response(rcode=dns.rcode.REFUSED),
        response(rcode=dns.rcode.NXDOMAIN),
        positive(flags=dns.flags.TC),
        positive(ttl=0),
        b"garbage",
    ],
    ids=["servfail", "refused", "nxdomain without soa", "truncated", "ttl 0", "garbage"],
)
def test_what_may_not_be_cached_is_not_stored(clock, wire):
    cache = make_cache(clock)
    cache.put(KEY_A, wire)
    assert len(cache) == 0 and cache.get(KEY_A) is None


def test_min_ttl_makes_a_ttl_0_answer_cacheable(clock):
    cache = make_cache(clock, min_ttl=10)
    cache.put(KEY_A, positive(ttl=0))
    assert cache.get(KEY_A)[1] is True


def oversized_response() -> bytes:
    """A valid, cacheable response over 65535 bytes: two answer sections glued (dnspython renders no such thing)."""
    records = [("www.example.com.", 300, "TXT", f'"{i:05d}{"x" * 240}"') for i in range(140)]
    half = response(rdtype="TXT", answer=records)
    question_end = 12 + len(b"\x03www\x07example\x03com\x00") + 4
    glued = half[:6] + (280).to_bytes(2, "big") + half[8:] + half[question_end:]
    assert len(glued) > MAX_RESPONSE
    assert len(dns.message.from_wire(glued).answer[0]) == 140  # the same records twice: parseable
    return glued


def test_a_response_over_65535_bytes_is_not_stored(clock):
    cache = make_cache(clock)
    cache.put(("www.example.com.", 16, 1), oversized_response())
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first(clock):
    cache = make_cache(clock, max_entries=2)
    cache.put(KEY_A, positive())
    cache.put(KEY_B, positive())
    assert cache.get(KEY_A) is not None  # A is now more recent than B
    cache.put(KEY_C, positive())
    assert len(cache) == 2
    assert cache.get(KEY_B) is None
    assert cache.get(KEY_A) is not None and cache.get(KEY_C) is not None


def test_put_refreshes_recency_and_replaces(clock):
    cache = make_cache(clock, max_entries=2)
    cache.put(KEY_A, positive(ttl=100))
    cache.put(KEY_B, positive())
    clock.now += 50
    cache.put(KEY_A, positive(ttl=100))
    cache.put(KEY_C, positive())
    assert cache.get(KEY_B) is None
    assert ttls(cache.get(KEY_A)[0])["answer"] == [100]


def test_max_entries_0_stores_nothing(clock):
    cache = make_cache(clock, max_entries=0)
    cache.put(KEY_A, positive())
    assert len(cache) == 0 and cache.get(KEY_A) is None


def test_the_soa_minimum_bounds_a_negative_entry(clock):
    cache = make_cache(clock, stale_for=0)
    cache.put(
        KEY_A, response(rcode=dns.rcode.NXDOMAIN, authority=[("example.com.", 900, "SOA", SOA.format(minimum=60))])
    )
    clock.now += 59
    assert cache.get(KEY_A)[1] is True
    clock.now += 1
    assert cache.get(KEY_A) is None


def test_an_answer_larger_than_its_edns_payload_is_kept_and_served(clock):
    cache = make_cache(clock)
    big = big_response()
    cache.put(KEY_A, big)
    served = cache.get(KEY_A)
    assert served is not None and len(dns.message.from_wire(served[0]).answer[0]) == 200
