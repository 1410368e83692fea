"""SplitResolvers with fake resolvers, and make_resolvers building both sides from the settings, asked through
DNS servers on loopback that each answer with an address of their own."""

from contextlib import asynccontextmanager

import dns.message
import dns.rdatatype
import pytest
import trio

from relay.config import Config, ConfigError
from relay.dns.resolvers import ResolverError, SplitResolvers, make_resolvers
from tests.dnsresolve.servers import DnsServer, answer_for, split_resolvers_for

A, PTR = dns.rdatatype.A, dns.rdatatype.PTR
LOCAL_KEY, FAR_KEY = ("printer.lan.", A, 1), ("www.example.com.", A, 1)


class FakeResolvers:
    """Answers every question with ``answer`` (or raises ``error``), and remembers what it was asked."""

    def __init__(self, answer: bytes = b"", error: Exception | None = None, close_error: Exception | None = None):
        self.answer, self.error, self.close_error = answer, error, close_error
        self.asked: list[tuple] = []
        self.closed = False

    async def resolve(self, key, timeout: float) -> bytes:
        self.asked.append((key, timeout))
        if self.error is not None:
            raise self.error
        return self.answer

    async def aclose(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error


def split(far: FakeResolvers, local: FakeResolvers) -> SplitResolvers:
    return SplitResolvers(far, local, Config.from_values({"upstream": "direct"}))


async def test_each_question_is_asked_of_one_side_with_the_whole_timeout():
    far, local = FakeResolvers(b"far answer"), FakeResolvers(b"local answer")
    resolvers = split(far, local)
    assert await resolvers.resolve(LOCAL_KEY, 1.5) == b"local answer"
    assert await resolvers.resolve(FAR_KEY, 2.5) == b"far answer"
    assert local.asked == [(LOCAL_KEY, 1.5)] and far.asked == [(FAR_KEY, 2.5)]


async def test_a_local_question_that_fails_is_not_asked_of_the_far_side():
    far, local = FakeResolvers(b"far answer"), FakeResolvers(error=ResolverError("no answer", "timeout"))
    with pytest.raises(ResolverError) as caught:
        await split(far, local).resolve(LOCAL_KEY, 1)
    assert caught.value.reason == "timeout" and far.asked == []


async def test_a_far_question_that_fails_is_not_asked_of_the_local_side():
    far, local = FakeResolvers(error=ResolverError("down", "no-healthy-upstream")), FakeResolvers(b"local")
    with pytest.raises(ResolverError):
        await split(far, local).resolve(FAR_KEY, 1)
    assert local.asked == []


async def test_a_reload_s_suffixes_apply_to_the_next_question():
    far, local = FakeResolvers(b"far answer"), FakeResolvers(b"local answer")
    resolvers = split(far, local)
    key = ("wiki.corp.", A, 1)
    assert await resolvers.resolve(key, 1) == b"far answer"
    assert await resolvers.resolve(LOCAL_KEY, 1) == b"local answer"
    resolvers.config = Config.from_values({"upstream": "direct", "dns-local-domain": ["corp"]})
    assert await resolvers.resolve(key, 1) == b"local answer"
    assert await resolvers.resolve(LOCAL_KEY, 1) == b"far answer"  # "lan" was a default the new one replaced


async def test_closing_closes_both_sides_even_when_the_first_fails_to():
    far, local = FakeResolvers(close_error=OSError("bad fd")), FakeResolvers()
    with pytest.raises(OSError):
        await split(far, local).aclose()
    assert far.closed and local.closed


# -- make_resolvers, against two DNS servers on loopback ---------------------------------------

LOCAL_ADDRESS, FAR_ADDRESS = "192.0.2.10", "198.51.100.20"


def addresses_in(answer: bytes) -> list[str]:
    return [rdata.to_text() for rrset in dns.message.from_wire(answer).answer for rdata in rrset]


@asynccontextmanager
async def servers():
    """(local, far): UDP and TCP DNS servers on loopback, each answering A with an address of its own."""
    async with trio.open_nursery() as nursery:
        local, far = await DnsServer().start(nursery), await DnsServer().start(nursery)
        local.udp_reply = lambda query: [answer_for(query, LOCAL_ADDRESS)]
        far.udp_reply = lambda query: [answer_for(query, FAR_ADDRESS)]
        yield local, far
        nursery.cancel_scope.cancel()


def asked_names(server: DnsServer) -> list[str]:
    return [dns.message.from_wire(query).question[0].name.to_text() for query in server.udp_queries]


async def test_the_settings_decide_which_server_answers(tmp_path):
    async with servers() as (local, far):
        values = {
            "upstream": "direct",
            "dns-upstream": [f"udp://127.0.0.1:{far.port}"],
            "dns-local": [f"udp://127.0.0.1:{local.port}"],
            "dns-local-domain": ["corp"],
            "bypass-domain": ["cdn.example"],
        }
        async with split_resolvers_for(values, str(tmp_path / "unread")) as resolvers:
            answers = {
                name: addresses_in(await resolvers.resolve((name, A, 1), 2))
                for name in ["wiki.corp.", "img.cdn.example.", "www.example.com.", "printer.lan."]
            }
            await resolvers.resolve(("4.3.168.192.in-addr.arpa.", PTR, 1), 2)
            await resolvers.resolve(("8.8.8.8.in-addr.arpa.", PTR, 1), 2)
    assert answers == {
        "wiki.corp.": [LOCAL_ADDRESS],
        "img.cdn.example.": [LOCAL_ADDRESS],
        "www.example.com.": [FAR_ADDRESS],
        "printer.lan.": [FAR_ADDRESS],  # the default suffixes were replaced by "corp"
    }
    assert asked_names(local) == ["wiki.corp.", "img.cdn.example.", "4.3.168.192.in-addr.arpa."]
    assert asked_names(far) == ["www.example.com.", "printer.lan.", "8.8.8.8.in-addr.arpa."]


async def test_by_default_the_local_side_is_resolv_conf_s_nameserver(tmp_path):
    """resolv.conf names no port: its nameservers are asked on 53, here closed ports, so only the far side is."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\nnameserver ::1\n")
    async with servers() as (_, far):
        values = {"upstream": "direct", "dns-upstream": [f"udp://127.0.0.1:{far.port}"]}
        async with split_resolvers_for(values, str(resolv_conf)) as resolvers:
            assert [r.url for r in resolvers.local.resolvers] == ["udp://127.0.0.1:53", "udp://[::1]:53"]
            assert [r.url for r in resolvers.far.resolvers] == [f"udp://127.0.0.1:{far.port}"]
            assert addresses_in(await resolvers.resolve(FAR_KEY, 2)) == [FAR_ADDRESS]
            assert resolvers.goes_local(("nas.home.arpa.", A, 1)) and not resolvers.goes_local(FAR_KEY)


def test_no_local_resolver_is_a_config_error_before_anything_is_opened(tmp_path):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("# nothing yet\n")
    config = Config.from_values({"upstream": "direct"})
    with pytest.raises(ConfigError) as caught:
        make_resolvers(config, pool=None, dialer=None, resolv_conf=str(resolv_conf))  # neither is needed yet
    assert "names no nameserver: give the LAN's resolver with --dns-local udp://IP" in str(caught.value)
