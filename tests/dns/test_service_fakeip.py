"""The DNS service in fake-ip mode, over real loopback UDP and TCP sockets, with scripted resolvers behind it."""

import ipaddress

import dns.message
import dns.rcode
import trio

from relay.dns.fakeip import FakeIps
from relay.dns.message import parse_query
from relay.dns.names import NameBook
from relay.dns.service import SourceRates
from relay.metrics import Metrics
from tests.dns.support import query
from tests.dns.test_service import (
    ScriptedResolvers,
    addresses_of,
    ask_udp,
    framed,
    read_frames,
    running,
    tcp_connection,
)

FAKE_IP = {"dns-mode": "fake-ip"}


async def test_a_and_aaaa_get_fake_addresses_with_ttl_1_and_nothing_is_asked_upstream():
    resolvers = ScriptedResolvers()
    async with running(resolvers, **FAKE_IP) as service:
        over_udp = await ask_udp(service, "www.example.com.", "A")
        again = await ask_udp(service, "WWW.example.com.", "A")
        stream = await tcp_connection(service)
        await stream.send_all(framed(dns.message.make_query("www.example.com.", "AAAA")))
        [over_tcp] = await read_frames(stream, 1)
        await stream.aclose()
    assert addresses_of(over_udp) == addresses_of(again) == ["198.18.0.1"]
    assert addresses_of(over_tcp) == ["fc00::1"]
    assert [reply.answer[0].ttl for reply in (over_udp, again, over_tcp)] == [1, 1, 1]
    assert resolvers.asked == []
    assert service.metrics.dns_queries == {("A", "fake-ip"): 2, ("AAAA", "fake-ip"): 1}
    assert service.fake_ips.name_for("198.18.0.1") == "www.example.com"


async def test_https_and_svcb_get_empty_answers_and_other_types_are_resolved():
    resolvers = ScriptedResolvers()
    async with running(resolvers, **FAKE_IP) as service:
        https = await ask_udp(service, "www.example.com.", "HTTPS")
        svcb = await ask_udp(service, "_dns.resolver.example.", "SVCB")
        mx = await ask_udp(service, "www.example.com.", "MX")
    assert https.rcode() == svcb.rcode() == dns.rcode.NOERROR and not https.answer and not svcb.answer
    assert [key[0] for key in resolvers.asked] == ["www.example.com."]  # the MX only
    assert mx.rcode() == dns.rcode.NOERROR
    assert service.metrics.dns_queries == {("HTTPS", "no-data"): 1, ("SVCB", "no-data"): 1, ("MX", "upstream"): 1}


async def test_excluded_names_and_bypassed_domains_get_real_answers():
    resolvers = ScriptedResolvers()
    values = {**FAKE_IP, "fake-ip-exclude": ["ntp.example"], "bypass-domain": ["cdn.example"]}
    async with running(resolvers, **values) as service:
        excluded = await ask_udp(service, "0.pool.ntp.example.", "A")
        bypassed = await ask_udp(service, "img.cdn.example.", "A")
        https = await ask_udp(service, "img.cdn.example.", "HTTPS")
        faked = await ask_udp(service, "pool.ntp.example.com.", "A")  # a suffix matches whole labels only
    assert addresses_of(excluded) == addresses_of(bypassed) == ["192.0.2.1"]
    assert addresses_of(faked) == ["198.18.0.1"]
    assert [key[0] for key in resolvers.asked] == ["0.pool.ntp.example.", "img.cdn.example.", "img.cdn.example."]
    assert https.rcode() == dns.rcode.NOERROR


async def test_a_single_label_is_resolved_as_in_real_mode():
    resolvers = ScriptedResolvers()
    async with running(resolvers, **FAKE_IP) as service:
        reply = await ask_udp(service, "printer.", "A")
    assert addresses_of(reply) == ["192.0.2.1"] and len(resolvers.asked) == 1


async def test_fake_answers_are_not_told_as_real_ones_are():
    """The pool maps its own addresses back; telling them would fill the name book with what it already knows."""
    names = NameBook()
    values = {**FAKE_IP, "fake-ip-exclude": ["real.example"]}
    async with running(names=names, **values) as service:
        await ask_udp(service, "fake.example.", "A")
        await ask_udp(service, "www.real.example.", "A")
        learnt = names.name_for("127.0.0.1", "192.0.2.1", trio.current_time())
    assert learnt == "www.real.example" and len(names) == 1


async def test_aaaa_off_and_dns_allow_come_before_the_pool():
    async with running(**FAKE_IP, **{"dns-aaaa": "off", "dns-allow": ["10.0.0.0/8"]}) as service:
        refused = await ask_udp(service, "www.example.com.", "A")
    assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
    async with running(**FAKE_IP, **{"dns-aaaa": "off"}) as service:
        aaaa = await ask_udp(service, "www.example.com.", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    assert service.fake_ips.in_use() == {4: 0, 6: 0}


async def test_real_mode_has_no_pool():
    resolvers = ScriptedResolvers()
    async with running(resolvers) as service:
        reply = await ask_udp(service, "www.example.com.", "A")
    assert service.fake_ips is None and addresses_of(reply) == ["192.0.2.1"]


def test_the_pool_use_is_a_metric():
    metrics = Metrics(version="t", fast_path="t")
    assert "fake_ips" not in metrics.render()
    metrics.fake_ips = FakeIps([ipaddress.ip_network("10.99.0.0/24")], [], max_names=2)
    for name in ("a.example", "b.example", "c.example"):
        metrics.fake_ips.answer(parse_query(query(name)))
    text = metrics.render()
    assert 'relay_dns_fake_ips_in_use{family="ipv4"} 2' in text
    assert "relay_dns_fake_ips_recycled_total 1" in text


async def test_new_names_are_limited_as_questions_upstream_are_and_held_ones_are_not():
    """A new name takes an address another may still be using (the pool recycles the least recently used):
    a client's flood of new names is limited by its rate, as questions that go upstream are."""
    async with running(ScriptedResolvers(), **FAKE_IP) as service:
        service.rates = SourceRates(burst=2, rate=0.0)
        replies = [
            service.answer_now(query(f"n{number}.example.com."), "127.0.0.1", over_udp=True) for number in range(4)
        ]
        again = service.answer_now(query("n0.example.com."), "127.0.0.1", over_udp=True)
    assert [reply is not None for reply in replies] == [True, True, False, False]
    assert addresses_of(dns.message.from_wire(again)) == ["198.18.0.1"]  # held already: answered all the same
    assert service.metrics.dns_queries == {("A", "fake-ip"): 3, ("A", "dropped"): 2}
    assert service.fake_ips.name_for("198.18.0.3") is None
