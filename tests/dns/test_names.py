import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dns.names import MAX_LIFETIME, MIN_LIFETIME, SWEEP_STEP, NameBook
from tests.dns.support import query, response

CLIENT, OTHER_CLIENT = "10.0.0.5", "10.0.0.6"
NOW = 1000.0


def answer(name="www.example.com.", rdtype="A", records=(), **kwargs) -> bytes:
    """A response to ``name``; each record is (owner, ttl, rdtype, rdata text)."""
    return response(name, rdtype, answer=records, **kwargs)


def book_with(*replies, client=CLIENT, **kwargs) -> NameBook:
    book = NameBook(**kwargs)
    for reply in replies:
        book.learn(client, reply, NOW)
    return book


def test_an_address_answered_is_known_by_the_name_asked_for_that_client_only():
    book = book_with(answer(records=[("www.example.com.", 300, "A", "192.0.2.1")]))
    assert book.name_for(CLIENT, "192.0.2.1", NOW) == "www.example.com"
    assert book.name_for(OTHER_CLIENT, "192.0.2.1", NOW) is None
    assert book.name_for(CLIENT, "192.0.2.2", NOW) is None


def test_the_name_is_kept_as_asked_lower_cased_through_a_cname_chain_to_every_address():
    reply = answer(
        "WWW.Example.COM.",
        records=[
            ("www.example.com.", 300, "CNAME", "edge.cdn.example.net."),
            ("edge.cdn.example.net.", 60, "CNAME", "node7.cdn.example.net."),
            ("node7.cdn.example.net.", 20, "A", "192.0.2.7"),
            ("node7.cdn.example.net.", 20, "A", "192.0.2.8"),
        ],
    )
    book = book_with(reply)
    assert [book.name_for(CLIENT, address, NOW) for address in ("192.0.2.7", "192.0.2.8")] == ["www.example.com"] * 2


def test_records_off_the_chain_are_not_taken_for_the_name():
    # An answer section may carry records for other owners (a resolver's extras, or a spoof): not this name's.
    reply = answer(
        records=[
            ("www.example.com.", 300, "CNAME", "a.example.net."),
            ("b.example.net.", 300, "A", "192.0.2.66"),
            ("unrelated.example.", 300, "CNAME", "c.example.net."),
            ("c.example.net.", 300, "A", "192.0.2.67"),
            ("a.example.net.", 300, "A", "192.0.2.1"),
        ]
    )
    book = book_with(reply)
    assert book.name_for(CLIENT, "192.0.2.1", NOW) == "www.example.com"
    assert book.name_for(CLIENT, "192.0.2.66", NOW) is None and book.name_for(CLIENT, "192.0.2.67", NOW) is None


def test_a_cname_loop_ends_and_learns_nothing():
    reply = answer(
        records=[
            ("www.example.com.", 300, "CNAME", "a.example.net."),
            ("a.example.net.", 300, "CNAME", "www.example.com."),
        ]
    )
    assert len(book_with(reply)) == 0


def test_aaaa_and_ipv4_mapped_clients_and_addresses_are_one_key():
    book = NameBook()
    book.learn("::ffff:10.0.0.5", answer(records=[("www.example.com.", 300, "A", "192.0.2.1")]), NOW)
    book.learn("FD00:0::5", answer("v6.example.", "AAAA", [("v6.example.", 300, "AAAA", "2001:db8:0:0::1")]), NOW)
    assert book.name_for("10.0.0.5", "::ffff:192.0.2.1", NOW) == "www.example.com"
    assert book.name_for("fd00::5", "2001:DB8::1", NOW) == "v6.example"


def test_an_entry_lives_for_its_ttl_within_the_floor_and_the_ceiling():
    book = book_with(
        answer("short.example.", records=[("short.example.", 1, "A", "192.0.2.1")]),
        answer("mid.example.", records=[("mid.example.", 120, "A", "192.0.2.2")]),
        answer("long.example.", records=[("long.example.", 86400, "A", "192.0.2.3")]),
    )
    for address, lifetime in (("192.0.2.1", MIN_LIFETIME), ("192.0.2.2", 120), ("192.0.2.3", MAX_LIFETIME)):
        assert book.name_for(CLIENT, address, NOW + lifetime - 0.5) is not None
        assert book.name_for(CLIENT, address, NOW + lifetime) is None
    assert len(book) == 0  # each expired one was dropped when asked for


def test_the_last_answer_for_an_address_wins_and_renews_it():
    book = book_with(answer("a.example.", records=[("a.example.", 300, "A", "192.0.2.1")]))
    book.learn(CLIENT, answer("b.example.", records=[("b.example.", 300, "A", "192.0.2.1")]), NOW + 200)
    assert book.name_for(CLIENT, "192.0.2.1", NOW + 400) == "b.example"


def test_the_least_recently_used_entry_goes_first():
    book = NameBook(max_entries=2)
    for index, address in enumerate(("192.0.2.1", "192.0.2.2")):
        book.learn(CLIENT, answer(f"n{index}.example.", records=[(f"n{index}.example.", 300, "A", address)]), NOW)
    assert book.name_for(CLIENT, "192.0.2.1", NOW) == "n0.example"  # used: now the newest
    book.learn(CLIENT, answer("n2.example.", records=[("n2.example.", 300, "A", "192.0.2.3")]), NOW)
    assert len(book) == 2
    assert book.name_for(CLIENT, "192.0.2.2", NOW) is None
    assert book.name_for(CLIENT, "192.0.2.1", NOW) == "n0.example"


def test_expired_entries_are_swept_by_a_later_learn_without_being_asked_for():
    book = book_with(
        *(answer(f"n{i}.example.", records=[(f"n{i}.example.", 30, "A", f"192.0.2.{i}")]) for i in range(50))
    )
    assert len(book) == 50
    book.learn(CLIENT, answer(records=[("www.example.com.", 300, "A", "198.51.100.1")]), NOW + 31)
    assert len(book) == 1


def test_a_learn_drops_a_bounded_number_of_expired_entries():
    count = 3 * SWEEP_STEP
    book = book_with(
        *(
            answer(f"n{i}.example.", records=[(f"n{i}.example.", 30, "A", f"10.0.{i // 250}.{i % 250}")])
            for i in range(count)
        )
    )
    fresh = answer(records=[("www.example.com.", 300, "A", "198.51.100.1")])
    book.learn(CLIENT, fresh, NOW + 31)
    assert len(book) == count - SWEEP_STEP + 1
    book.learn(CLIENT, fresh, NOW + 31)
    book.learn(CLIENT, fresh, NOW + 31)
    assert len(book) == 1


def test_expired_entries_behind_a_live_one_wait_for_it_and_are_never_given():
    book = book_with(
        answer("long.example.", records=[("long.example.", 300, "A", "198.51.100.9")]),
        *(answer(f"n{i}.example.", records=[(f"n{i}.example.", 30, "A", f"192.0.2.{i}")]) for i in range(10)),
    )
    fresh = answer(records=[("www.example.com.", 3000, "A", "198.51.100.1")])
    book.learn(CLIENT, fresh, NOW + 31)
    assert len(book) == 12  # the oldest is alive: the sweep stops there
    assert book.name_for(CLIENT, "192.0.2.3", NOW + 31) is None  # expired, so dropped when asked for
    assert len(book) == 11
    book.learn(CLIENT, fresh, NOW + 301)
    assert len(book) == 1


@pytest.mark.parametrize(
    "reply",
    [
        query(),  # a query, not a reply
        answer("localhost.", records=[("localhost.", 300, "A", "127.0.0.1")]),
        answer("10.0.0.1.", records=[("10.0.0.1.", 300, "A", "192.0.2.1")]),  # an address in disguise
        answer("we\\ ird.example.", records=[("we\\ ird.example.", 300, "A", "192.0.2.1")]),
        answer("www.example.com.", "MX", [("www.example.com.", 300, "MX", "10 mail.example.com.")]),
        answer(rcode=dns.rcode.NXDOMAIN),
        b"",
        b"\x12\x34\x81\x80" + b"\x00" * 4,
    ],
    ids=["query", "localhost", "ip-literal", "escaped-octets", "no-address", "nxdomain", "empty", "short"],
)
def test_only_plain_names_with_addresses_are_learned(reply):
    assert len(book_with(reply)) == 0


def test_a_client_that_is_no_address_is_ignored():
    book = NameBook()
    book.learn("not-an-address", answer(records=[("www.example.com.", 300, "A", "192.0.2.1")]), NOW)
    assert len(book) == 0
    assert book.name_for("not-an-address", "192.0.2.1", NOW) is None
    assert book.name_for(CLIENT, "garbage", NOW) is None


@settings(max_examples=200)
@given(reply=st.binary(max_size=600), client=st.sampled_from([CLIENT, "fd00::5", "x"]))
def test_garbage_never_raises(reply, client):
    book = NameBook(max_entries=4)
    book.learn(client, reply, NOW)
    assert len(book) <= 4


@st.composite
def replies(draw):
    """A reply for one of a few names, with addresses on a chain of 0-2 CNAMEs and some off it."""
    name = draw(st.sampled_from(["a.example.", "b.example.", "C.Example."]))
    chain = [name, *draw(st.lists(st.sampled_from(["x.cdn.", "y.cdn.", "z.cdn."]), max_size=2, unique=True))]
    records = [(owner, 300, "CNAME", target) for owner, target in zip(chain, chain[1:])]
    on_chain = draw(st.lists(st.integers(1, 20), max_size=4, unique=True))
    off_chain = draw(st.lists(st.integers(21, 40), max_size=2, unique=True))
    records += [(chain[-1], draw(st.integers(0, 100_000)), "A", f"192.0.2.{i}") for i in on_chain]
    records += [("other.cdn.", 300, "A", f"192.0.2.{i}") for i in off_chain]
    shuffled = draw(st.permutations(records))
    return name.lower().rstrip("."), [f"192.0.2.{i}" for i in on_chain], answer(name, records=shuffled)


@settings(max_examples=200)
@given(
    steps=st.lists(st.tuples(st.sampled_from([CLIENT, OTHER_CLIENT]), replies(), st.floats(0, 30)), max_size=12),
    max_entries=st.integers(1, 16),
)
def test_the_book_holds_the_last_name_per_client_and_address_within_its_bound(steps, max_entries):
    """Against a model: a dict of (client, address) -> (name, when), of which the book keeps what it has room for."""
    book, model, now = NameBook(max_entries=max_entries), {}, NOW
    for client, (name, addresses, reply), elapsed in steps:
        now += elapsed
        book.learn(client, reply, now)
        for address in addresses:
            model[client, address] = name
        assert len(book) <= max_entries
        if len(addresses) <= max_entries:  # what was just learned is there, whatever it pushed out
            assert [book.name_for(client, address, now) for address in addresses] == [name] * len(addresses)
    for (client, address), name in model.items():
        assert book.name_for(client, address, now) in (name, None)  # evicted or expired, never another's
    for client in (CLIENT, OTHER_CLIENT):
        assert all(book.name_for(client, f"192.0.2.{i}", now) is None for i in range(21, 41))  # off every chain


def test_a_name_replaced_for_a_client_and_address_is_told_to_displaced():
    book = NameBook()
    displaced = []
    book.displaced = lambda *args: displaced.append(args)

    def to_x(name):
        return answer(name, records=[(name, 60, "A", "192.0.2.1")])

    book.learn("10.0.0.2", to_x("a.example."), 0.0)
    book.learn("10.0.0.2", to_x("a.example."), 1.0)  # the same name again: nothing replaced
    book.learn("10.0.0.3", to_x("b.example."), 2.0)  # another client: nothing replaced
    book.learn("10.0.0.2", to_x("b.example."), 3.0)
    assert displaced == [("10.0.0.2", "a.example", "192.0.2.1")]
