"""The DNS service over real loopback UDP and TCP sockets, with scripted resolvers behind it."""

import functools
import ipaddress
import logging
import socket
import struct
from contextlib import asynccontextmanager

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from relay.config import Config, ConfigError
from relay.dns import fakeip
from relay.dns import service as service_module
from relay.dns.cache import STALE_TTL, Cache
from relay.dns.names import NameBook
from relay.dns.resolvers import ResolverError
from relay.dns.service import DnsService, SourceRates
from relay.metrics import Metrics


class ScriptedResolvers:
    """Answers every question with ``count`` A records from 192.0.2.0/24, after ``delay`` seconds; or fails."""

    def __init__(self, delay: float = 0.0, ttl: int = 300, count: int = 1, delays: dict | None = None):
        self.delay, self.ttl, self.count = delay, ttl, count
        self.delays = delays or {}
        self.asked: list = []
        self.failing: ResolverError | None = None
        self.hanging = False

    async def resolve(self, key, timeout: float) -> bytes:
        self.asked.append(key)
        if self.hanging:
            await trio.sleep_forever()
        await trio.sleep(self.delays.get(key[0], self.delay))
        if self.failing is not None:
            raise self.failing
        query = dns.message.make_query(key[0], key[1])
        response = dns.message.make_response(query)
        if key[1] == dns.rdatatype.A:
            addresses = [str(ipaddress.ip_address("192.0.2.1") + i) for i in range(self.count)]
            response.answer.append(dns.rrset.from_text_list(key[0], self.ttl, "IN", "A", addresses))
        return response.to_wire()

    async def aclose(self) -> None:
        pass


def config_for(**values) -> Config:
    config = Config.from_values({"upstream": ["127.0.0.1:3128"], "dns": ["127.0.0.1:53"], **values})
    if "dns" not in values:
        config.dns = [("127.0.0.1", 0)]  # a free port, UDP and TCP alike (the command line wants 1-65535)
    return config


@asynccontextmanager
async def running(resolvers=None, cache=None, names=None, **values):
    config = config_for(**values)
    metrics = Metrics(version="t", fast_path="t")
    service = DnsService(config, resolvers or ScriptedResolvers(), metrics, names, cache, fakeip.for_config(config))
    service.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        yield service
        nursery.cancel_scope.cancel()


async def ask_udp(service, name="host.example.", rdtype="A", *, query=None, use_edns=None, timeout=3.0):
    query = query or dns.message.make_query(name, rdtype, use_edns=use_edns)
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(query.to_wire(), service.addresses[0])
        with trio.fail_after(timeout):
            wire = await sock.recv(65535)
    return dns.message.from_wire(wire)


async def silence_udp(service, wire: bytes, wait: float = 0.3) -> bool:
    """Whether ``wire`` sent by UDP gets no reply within ``wait``."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(wire, service.addresses[0])
        with trio.move_on_after(wait):
            await sock.recv(65535)
            return False
    return True


async def tcp_connection(service):
    return await trio.open_tcp_stream(*service.addresses[0])


async def read_frames(stream, count: int, timeout: float = 3.0) -> list[dns.message.Message]:
    buffer, messages = b"", []
    with trio.fail_after(timeout):
        while len(messages) < count:
            data = await stream.receive_some(65536)
            assert data, "closed before all answers came"
            buffer += data
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                length = struct.unpack("!H", buffer[:2])[0]
                messages.append(dns.message.from_wire(buffer[2 : 2 + length]))
                buffer = buffer[2 + length :]
    return messages


def framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


def addresses_of(reply: dns.message.Message) -> list[str]:
    return [rdata.address for rrset in reply.answer for rdata in rrset]


async def test_a_second_question_is_answered_from_the_cache_with_the_time_left():
    resolvers = ScriptedResolvers(ttl=300)
    async with running(resolvers) as service:
        first = await ask_udp(service)
        second = await ask_udp(service, "HOST.example.")
    assert addresses_of(first) == addresses_of(second) == ["192.0.2.1"]
    assert len(resolvers.asked) == 1
    assert second.answer[0].ttl <= first.answer[0].ttl <= 300
    assert str(second.question[0].name) == "HOST.example."  # the client's own casing (0x20)
    assert service.metrics.dns_queries == {("A", "upstream"): 1, ("A", "cache"): 1}


async def test_identical_questions_asked_at_once_go_upstream_once():
    resolvers = ScriptedResolvers(delay=0.2)
    replies = []
    async with running(resolvers) as service:

        async def ask(i):
            query = dns.message.make_query("same.example.", "A")
            query.id = 1000 + i
            replies.append((query.id, await ask_udp(service, query=query)))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(ask, i)
    assert len(resolvers.asked) == 1
    assert len(replies) == 20 and all(reply.id == asked and addresses_of(reply) for asked, reply in replies)
    assert service.questions == {} and service.waiting == 0


async def test_a_client_outside_dns_allow_is_refused_and_nothing_is_asked_upstream():
    resolvers = ScriptedResolvers()
    async with running(resolvers, **{"dns-allow": ["10.0.0.0/8"]}) as service:
        reply = await ask_udp(service)
        garbage_answered = not await silence_udp(service, b"\x12\x34" + b"\x00" * 3)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert resolvers.asked == [] and not garbage_answered


async def test_every_upstream_failing_is_servfail_and_a_hang_is_cut_at_the_timeout():
    resolvers = ScriptedResolvers()
    resolvers.failing = ResolverError("down", "no-healthy-upstream")
    async with running(resolvers, **{"dns-timeout": "0.3"}) as service:
        failed = await ask_udp(service)
        resolvers.failing, resolvers.hanging = None, True
        started = trio.current_time()
        hung = await ask_udp(service, "other.example.", timeout=5)
        waited = trio.current_time() - started
    assert failed.rcode() == hung.rcode() == dns.rcode.SERVFAIL
    assert waited < 0.3 + service_module.ANSWER_GRACE + 1  # bounded, well short of the 5 s the client waits
    assert service.metrics.dns_upstream_failures == {"no-healthy-upstream": 1, "timeout": 1}


class AnsweringWith(ScriptedResolvers):
    """Answers with ``rcode`` and no records once ``rcode`` is set: a resolver that is up but cannot resolve."""

    rcode: int | None = None

    async def resolve(self, key, timeout: float) -> bytes:
        wire = await super().resolve(key, timeout)
        if self.rcode is None:
            return wire
        response = dns.message.make_response(dns.message.make_query(key[0], key[1]))
        response.set_rcode(self.rcode)
        return response.to_wire()


def no_answer(resolvers):
    resolvers.failing = ResolverError("down", "connect-timeout")


def answering(rcode):
    return lambda resolvers: setattr(resolvers, "rcode", rcode)


@pytest.mark.parametrize(
    "fail",
    [no_answer, answering(dns.rcode.SERVFAIL), answering(dns.rcode.REFUSED)],
    ids=["no-answer", "servfail", "refused"],
)
async def test_an_expired_answer_is_served_stale_while_upstreams_fail(fail):
    """RFC 8767 4: an answer with any rcode but NOERROR or NXDOMAIN is a failure to refresh, as no answer is."""
    now = [0.0]
    cache = Cache(100, 0, 86400, clock=lambda: now[0])
    resolvers = AnsweringWith(ttl=60)
    async with running(resolvers, cache) as service:
        fresh = await ask_udp(service)
        now[0] += 120
        fail(resolvers)
        stale = await ask_udp(service)
        uncached = await ask_udp(service, "never-asked.example.")
    assert stale.rcode() == dns.rcode.NOERROR and addresses_of(stale) == addresses_of(fresh)
    assert stale.answer[0].ttl == STALE_TTL
    assert len(resolvers.asked) == 3 and ("A", "stale") in service.metrics.dns_queries
    # Nothing stale to serve: the upstream's own answer, or SERVFAIL when there was none.
    assert uncached.rcode() == (resolvers.rcode or dns.rcode.SERVFAIL)


async def test_tcp_answers_pipelined_queries_as_they_are_ready_and_keeps_their_ids():
    resolvers = ScriptedResolvers(delays={"slow.example.": 0.3})
    async with running(resolvers) as service:
        stream = await tcp_connection(service)
        slow = dns.message.make_query("slow.example.", "A")
        fast = dns.message.make_query("fast.example.", "A")
        slow.id, fast.id = 1, 2
        await stream.send_all(framed(slow) + framed(fast))  # one segment
        answers = await read_frames(stream, 2)
        await stream.aclose()
    assert [answer.id for answer in answers] == [2, 1]
    assert [str(answer.question[0].name) for answer in answers] == ["fast.example.", "slow.example."]


async def test_tcp_frames_split_byte_by_byte_are_answered():
    async with running() as service:
        stream = await tcp_connection(service)
        for byte in framed(dns.message.make_query("split.example.", "A")):
            await stream.send_all(bytes([byte]))
        [answer] = await read_frames(stream, 1)
        await stream.aclose()
    assert addresses_of(answer) == ["192.0.2.1"]


async def test_an_idle_tcp_client_is_closed(monkeypatch):
    monkeypatch.setattr(service_module, "TCP_IDLE_TIMEOUT", 0.2)
    async with running() as service:
        stream = await tcp_connection(service)
        with trio.fail_after(2):
            assert await stream.receive_some(100) == b""
        await stream.aclose()
        # every slot free again but the one the accept loop holds for the next client
        assert service.tcp_slots.value == service_module.MAX_TCP_CONNECTIONS - 1


async def test_an_empty_tcp_frame_closes_the_connection_and_the_service_goes_on():
    async with running() as service:
        stream = await tcp_connection(service)
        await stream.send_all(b"\x00\x00")
        with trio.fail_after(2):
            assert await stream.receive_some(100) == b""
        await stream.aclose()
        reply = await ask_udp(service)
    assert reply.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("owed", [False, True], ids=["idle", "answer-owed"])
async def test_a_tcp_client_that_resets_its_connection_costs_that_connection_only(owed):
    """A reset surfaces in the connection's reading loop; it must not end the service (and with it the relay)."""
    async with running(ScriptedResolvers(delay=0.2)) as service:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect(service.addresses[0])
        if owed:
            await sock.send(framed(dns.message.make_query("slow.example.", "A")))
        await trio.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        await trio.sleep(0.3)
        reply = await ask_udp(service)
        assert service.tcp_slots.value == service_module.MAX_TCP_CONNECTIONS - 1
    assert reply.rcode() == dns.rcode.NOERROR


async def test_a_tcp_client_that_stops_reading_is_closed_never_sent_half_a_frame_then_more(monkeypatch):
    """A write that times out may have sent part of a frame: anything written after it would be read as
    garbage, so the connection is closed instead (what the client then has ends at most with one cut frame)."""
    monkeypatch.setattr(service_module, "TCP_WRITE_TIMEOUT", 0.3)
    queries = [dns.message.make_query(f"n{number}.example.", "A") for number in range(2000)]
    async with running(ScriptedResolvers(count=250)) as service:  # answers of about 4 KB
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(service.addresses[0])
        stream = trio.SocketStream(sock)
        with trio.move_on_after(1):
            await stream.send_all(b"".join(framed(query) for query in queries))  # stalls: nothing is read
        await trio.sleep(1)  # the server's writes time out meanwhile
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(1 << 20):
                data += chunk
        await stream.aclose()
    whole = 0
    while len(data) >= 2 and len(data) >= 2 + struct.unpack("!H", data[:2])[0]:
        length = struct.unpack("!H", data[:2])[0]
        assert dns.message.from_wire(data[2 : 2 + length]).answer  # raises on a cut frame with another after it
        whole, data = whole + 1, data[2 + length :]
    assert whole > 0


@pytest.mark.parametrize(
    "wire,rcode",
    [
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example", dns.rcode.FORMERR),  # cut in its question
        (b"\x12\x34\x81\x80" + b"\x00" * 8, None),  # a response: never answered, or two relays loop
        (b"\x12", None),  # shorter than a header
    ],
)
async def test_malformed_queries_get_formerr_or_nothing_and_the_next_is_answered(wire, rcode):
    async with running() as service:
        if rcode is None:
            assert await silence_udp(service, wire)
        else:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.sendto(wire, service.addresses[0])
                with trio.fail_after(2):
                    reply = await sock.recv(512)
            assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == rcode
        assert (await ask_udp(service)).rcode() == dns.rcode.NOERROR


async def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp():
    resolvers = ScriptedResolvers(count=100)  # 100 A records: about 1.6 KB
    async with running(resolvers) as service:
        small = await ask_udp(service, "big.example.")
        large = await ask_udp(service, "big.example.", use_edns=0)  # dnspython offers 1232 bytes: still too small
        stream = await tcp_connection(service)
        await stream.send_all(framed(dns.message.make_query("big.example.", "A")))
        [whole] = await read_frames(stream, 1)
        await stream.aclose()
    assert small.flags & dns.flags.TC and not small.answer
    assert large.flags & dns.flags.TC and not large.answer
    assert len(addresses_of(whole)) == 100 and not whole.flags & dns.flags.TC


async def test_a_flood_of_upstream_questions_from_one_source_is_dropped_past_its_burst():
    async with running() as service:
        service.rates = SourceRates(burst=5, rate=0.001)
        answered = []
        for index in range(8):
            wire = dns.message.make_query(f"n{index}.example.", "A").to_wire()
            answered.append(not await silence_udp(service, wire, 0.5 if index < 5 else 0.1))
        # The cache costs no upstream question: its answers are not limited.
        cached = [not await silence_udp(service, dns.message.make_query("n0.example.", "A").to_wire(), 0.5)]
    assert answered == [True] * 5 + [False] * 3 and cached == [True]
    assert service.metrics.dns_queries[("A", "dropped")] == 3
    assert service.metrics.dns_queries[("A", "cache")] == 1


def test_source_rates_stay_bounded_under_many_sources():
    now = [0.0]
    rates = SourceRates(burst=2, rate=1.0, kept=100, clock=lambda: now[0])
    for i in range(10_000):
        assert rates.allow(f"10.0.{i // 256}.{i % 256}")
        now[0] += 0.0001
    assert len(rates) <= 100
    assert rates.allow("192.168.0.1") and rates.allow("192.168.0.1") and not rates.allow("192.168.0.1")
    now[0] += 1.0
    assert rates.allow("192.168.0.1")


async def test_aaaa_off_answers_no_data_without_asking():
    resolvers = ScriptedResolvers()
    async with running(resolvers, **{"dns-aaaa": "off"}) as service:
        aaaa = await ask_udp(service, rdtype="AAAA")
        a = await ask_udp(service, rdtype="A")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    assert [key[1] for key in resolvers.asked] == [dns.rdatatype.A] and addresses_of(a)


async def test_too_many_questions_in_flight_are_servfail_at_once(monkeypatch):
    monkeypatch.setattr(service_module, "MAX_IN_FLIGHT", 2)
    resolvers = ScriptedResolvers(delay=10)
    async with running(resolvers) as service:
        async with trio.open_nursery() as nursery:
            for name in ("one.example.", "two.example."):
                nursery.start_soon(functools.partial(ask_udp, service, name, timeout=15))
            await trio.sleep(0.2)
            third = await ask_udp(service, "three.example.", timeout=1)
            nursery.cancel_scope.cancel()
    assert third.rcode() == dns.rcode.SERVFAIL and len(resolvers.asked) == 2


async def test_every_reply_with_addresses_is_learnt_for_its_client():
    names = NameBook()
    async with running(names=names) as service:
        await ask_udp(service)
        learnt = names.name_for("127.0.0.1", "192.0.2.1", trio.current_time())
        service.names = fresh = NameBook()
        await ask_udp(service)  # from the cache, by the hot path
        relearnt = fresh.name_for("127.0.0.1", "192.0.2.1", trio.current_time())
    assert learnt == relearnt == "host.example"
    assert service.metrics.dns_queries[("A", "cache")] == 1


async def test_hits_go_to_the_fast_path_which_tells_the_name_book_and_the_metrics():
    """A miss, then a hit answered by Python (which hands the answer to service.hits), then hits answered by the
    table alone: the same answers, counted, and a client new to the answer learnt in the name book."""
    names = NameBook()
    async with running(names=names) as service:
        first = await ask_udp(service)
        second = await ask_udp(service)
        assert len(service.hits) == 1
        service.names = fresh = NameBook()
        replies = [await ask_udp(service) for _ in range(3)]
        learnt = fresh.name_for("127.0.0.1", "192.0.2.1", trio.current_time())
    assert addresses_of(first) == addresses_of(second) == addresses_of(replies[-1]) == ["192.0.2.1"]
    assert all(0 < reply.answer[0].ttl <= 300 for reply in replies)
    assert learnt == "host.example"
    assert service.metrics.dns_queries[("A", "cache")] == 4
    assert service.metrics.dns_queries[("A", "upstream")] == 1


async def test_the_last_name_given_for_an_address_wins_through_the_fast_path_too():
    """Two names with one address (a CDN's): a client given a, then b, then a again (by the table, within the
    time it would not be told again) is known by the book to have asked for a last."""
    names = NameBook()
    async with running(names=names) as service:
        for name in ("a.example.", "a.example.", "a.example.", "b.example.", "b.example.", "b.example."):
            await ask_udp(service, name)
        assert names.name_for("127.0.0.1", "192.0.2.1", trio.current_time()) == "b.example"
        cache_answers = service.metrics.dns_queries[("A", "cache")]
        await ask_udp(service, "a.example.")
        assert service.metrics.dns_queries[("A", "cache")] == cache_answers + 1 and len(service.hits) == 2
        assert names.name_for("127.0.0.1", "192.0.2.1", trio.current_time()) == "a.example"


async def test_a_reload_empties_the_fast_path_and_dns_allow_holds_for_it_too():
    async with running() as service:
        await ask_udp(service)
        await ask_udp(service)
        assert len(service.hits) == 1
        service.allow = [ipaddress.ip_network("10.0.0.0/8")]  # what a reload does, 127.0.0.1 now outside
        reply = await ask_udp(service)
        assert len(service.hits) == 0
    assert reply.rcode() == dns.rcode.REFUSED


async def test_an_answer_replaced_in_the_cache_is_forgotten_by_the_fast_path():
    cache = Cache(10, 0, 86400)
    async with running(cache=cache) as service:
        await ask_udp(service)
        await ask_udp(service)
        assert len(service.hits) == 1
        replaced = dns.message.make_response(dns.message.make_query("host.example.", "A"))
        replaced.answer.append(dns.rrset.from_text("host.example.", 60, "IN", "A", "192.0.2.99"))
        cache.put(("host.example.", dns.rdatatype.A, 1), replaced.to_wire())
        assert len(service.hits) == 0
        reply = await ask_udp(service)
    assert addresses_of(reply) == ["192.0.2.99"]  # the new answer, by Python, not the old one from the table


def test_a_taken_port_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        service = DnsService(config_for(dns=[f"127.0.0.1:{port}"]), ScriptedResolvers(), None)
        with pytest.raises(ConfigError, match=rf"cannot serve DNS on 127.0.0.1:{port} \(UDP\)"):
            service.open()
    assert service.sockets == []


def test_dns_with_several_workers_is_refused():
    with pytest.raises(ConfigError, match="--dns needs --workers 1"):
        config_for(workers="2")


@pytest.mark.parametrize("level,shown", [(logging.WARNING, False), (logging.INFO, True)])
async def test_what_a_client_looked_up_is_logged_with_v_only(caplog, level, shown):
    caplog.set_level(level, logger="relay")
    resolvers = ScriptedResolvers()
    resolvers.failing = ResolverError("down", "connect-timeout")  # the failure warning must not name it either
    async with running(resolvers) as service:
        await ask_udp(service, "private-lookup.example.")
        resolvers.failing = None
        await ask_udp(service, "another-private.example.")
    assert ("private-lookup.example" in caplog.text) is shown
    assert ("another-private.example" in caplog.text) is shown
    assert "DNS upstreams failed" in caplog.text or level > logging.WARNING


IP_ADDR_JSON = """[{"ifname": "lan0", "addr_info": [
    {"family": "inet", "local": "192.168.7.1", "prefixlen": 24},
    {"family": "inet", "local": "192.168.7.1", "prefixlen": 24},
    {"family": "inet6", "local": "fd00:7::1", "prefixlen": 64},
    {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
    {"family": "inet", "prefixlen": 24}, {"family": "inet", "local": "bogus", "prefixlen": 24}]}]"""


def test_the_networks_of_an_interface_are_read_from_ip_json():
    assert [str(network) for network in service_module.interface_networks(IP_ADDR_JSON)] == [
        "192.168.7.0/24",
        "fd00:7::/64",
        "fe80::/64",
    ]


def test_by_default_the_lan_interfaces_networks_are_answered_and_no_other_private_range(monkeypatch):
    monkeypatch.setattr(service_module, "_ip_addr_json", lambda iface: IP_ADDR_JSON)
    networks = service_module.allowed_networks(config_for(**{"lan-iface": ["lan0"]}))
    allowed = lambda address: any(ipaddress.ip_address(address) in net for net in networks)  # noqa: E731
    assert allowed("192.168.7.20") and allowed("fd00:7::5") and allowed("127.0.0.1") and allowed("::1")
    assert not allowed("10.0.0.1") and not allowed("192.168.8.1") and not allowed("fd00:8::1")
    explicit = service_module.allowed_networks(config_for(**{"lan-iface": ["lan0"], "dns-allow": ["10.0.0.0/8"]}))
    assert [str(network) for network in explicit] == ["10.0.0.0/8"]


def test_a_lan_interface_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--lan-iface no-such-if0: cannot read its addresses for --dns-allow: "):
        service_module.allowed_networks(config_for(**{"lan-iface": ["no-such-if0"]}))


def test_the_loopback_interface_is_read_for_real():
    networks = service_module.allowed_networks(config_for(**{"lan-iface": ["lo"]}))
    assert ipaddress.ip_network("127.0.0.0/8") in networks


@pytest.mark.parametrize("asked", ["127.0.0.2", "127.0.0.1"])
async def test_on_a_wildcard_address_the_reply_comes_from_the_address_asked(asked):
    """Bound to 0.0.0.0, the kernel would send from the route's address (127.0.0.1 here): a client that
    asked 127.0.0.2 would drop it, as a connected socket does."""
    config = config_for()
    config.dns = [("0.0.0.0", 0)]
    service = DnsService(config, ScriptedResolvers(), Metrics(version="t", fast_path="t"))
    service.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        with trio.socket.socket(type=socket.SOCK_DGRAM) as client:
            await client.connect((asked, service.addresses[0][1]))
            for _ in range(2):  # upstream, then from the cache
                await client.send(dns.message.make_query("host.example.", "A").to_wire())
                with trio.fail_after(3):
                    reply = dns.message.from_wire(await client.recv(4096))
                assert addresses_of(reply) == ["192.0.2.1"]
        nursery.cancel_scope.cancel()


def test_a_link_local_client_counts_only_on_a_lan_interface():
    """fe80::/64 is on every link: with --lan-iface, a neighbour on the WAN link is no LAN client."""
    lan = (
        '[{"ifname": "br-lan", "addr_info": [{"local": "192.168.1.1", "prefixlen": 24},'
        ' {"local": "fe80::1", "prefixlen": 64, "scope": "link"}]}]'
    )
    service = DnsService(
        config_for(**{"lan-iface": ["br-lan"]}), ScriptedResolvers(), Metrics(version="t", fast_path="t")
    )
    service.allow = service_module.interface_networks(lan)
    assert service.allowed("fe80::99%br-lan") and service.allowed("192.168.1.7")
    assert not service.allowed("fe80::99%wan0")
    assert not service.allowed("fe80::99%1")  # a scope by number: lo, not br-lan


async def stranger_connection(service) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind(("127.0.0.2", 0))  # outside --dns-allow
    await sock.connect(service.addresses[0])
    return trio.SocketStream(sock)


async def test_clients_outside_dns_allow_get_refused_over_tcp_without_holding_the_lans_slots(monkeypatch):
    monkeypatch.setattr(service_module, "MAX_TCP_CONNECTIONS", 2)
    monkeypatch.setattr(service_module, "STRANGER_TCP_CONNECTIONS", 2)
    monkeypatch.setattr(service_module, "STRANGER_TCP_TIMEOUT", 0.5)
    async with running(**{"dns-allow": ["127.0.0.1/32"]}) as service:
        strangers = [await stranger_connection(service) for _ in range(3)]
        await strangers[0].send_all(framed(dns.message.make_query("host.example.", "A")))
        [refused] = await read_frames(strangers[0], 1)
        assert refused.rcode() == dns.rcode.REFUSED
        with trio.fail_after(3):
            assert await strangers[2].receive_some(10) == b""  # past their own slots: closed at once
            for stranger in strangers[:2]:  # closed STRANGER_TCP_TIMEOUT after they came, answered or not
                assert await stranger.receive_some(10) == b""
        allowed = await trio.open_tcp_stream(*service.addresses[0])  # both LAN slots were free all along
        other = await trio.open_tcp_stream(*service.addresses[0])
        for stream in (allowed, other):
            await stream.send_all(framed(dns.message.make_query("host.example.", "A")))
            [reply] = await read_frames(stream, 1, timeout=3.0)
            assert reply.rcode() == dns.rcode.NOERROR
        for stream in [*strangers, allowed, other]:
            await stream.aclose()


async def test_bytes_trickled_into_one_query_do_not_keep_a_connection_past_the_idle_timeout(monkeypatch):
    monkeypatch.setattr(service_module, "TCP_IDLE_TIMEOUT", 0.5)
    async with running() as service:
        stream = await trio.open_tcp_stream(*service.addresses[0])
        await stream.send_all(b"\xff\xff")  # a 65535-byte query announced
        closed = False
        with trio.move_on_after(3):
            for _ in range(10):  # one byte every 0.3 s, for six idle timeouts
                await trio.sleep(0.3)
                try:
                    await stream.send_all(b"x")
                except trio.BrokenResourceError:
                    closed = True
                    break
        await stream.aclose()
    assert closed
