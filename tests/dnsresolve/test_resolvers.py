"""The resolvers against DNS servers on loopback (reached "direct", the relay's upstream being none):
UDP, TCP pipelined on one connection, DoH over one HTTP/2 connection; and their order and health."""

import socket
from contextlib import asynccontextmanager

import dns.message
import dns.rdatatype
import pytest
import trio
import trio.testing
import trustme

from relay.dns import resolvers
from relay.dns.resolvers import ResolverError, Resolvers
from tests.dnsresolve.servers import ANSWER_ADDRESS, DnsServer, DohServer, answer_for, resolver_for

KEY = ("host.example.", dns.rdatatype.A, 1)


def addresses_in(answer: bytes) -> list[str]:
    return [rdata.address for rrset in dns.message.from_wire(answer).answer for rdata in rrset]


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@asynccontextmanager
async def dns_server():
    async with trio.open_nursery() as nursery:
        yield await DnsServer().start(nursery)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def doh_server(ca, **options):
    async with trio.open_nursery() as nursery:
        yield await DohServer(ca, **options).start(nursery)
        nursery.cancel_scope.cancel()


# -- udp:// --------------------------------------------------------------------------------------


async def test_udp_skips_answers_that_do_not_match_and_takes_the_one_that_does():
    async with dns_server() as server:

        def replies(query):
            wrong_id = bytearray(answer_for(query, "192.0.2.66"))
            wrong_id[:2] = ((int.from_bytes(query[:2], "big") + 1) % 65536).to_bytes(2, "big")
            other_name = answer_for(dns.message.make_query("other.example.", "A").to_wire(), "192.0.2.67")
            return [bytes(wrong_id), other_name, b"garbage", answer_for(query)]

        server.udp_reply = replies
        async with resolver_for(f"udp://127.0.0.1:{server.port}") as resolver:
            answer = await resolver.resolve(KEY, 2)
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_udp_uses_a_new_random_id_and_source_port_per_query():
    async with dns_server() as server, resolver_for(f"udp://127.0.0.1:{server.port}") as resolver:
        for _ in range(8):
            await resolver.resolve(KEY, 2)
    assert len(server.udp_queries) == 8
    assert len({int.from_bytes(query[:2], "big") for query in server.udp_queries}) > 1
    assert len(set(server.udp_sources)) == 8


async def test_udp_truncated_answer_is_asked_again_over_tcp():
    async with dns_server() as server:
        server.udp_reply = lambda query: [answer_for(query, truncated=True)]
        async with resolver_for(f"udp://127.0.0.1:{server.port}") as resolver:
            answer = await resolver.resolve(KEY, 2)
        assert server.tcp_connections == 1
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_udp_silent_server_times_out_within_the_timeout():
    async with dns_server() as server:
        server.udp_reply = lambda query: []
        async with resolver_for(f"udp://127.0.0.1:{server.port}") as resolver:
            with trio.fail_after(5):  # the test's own bound: the resolver must give up at 1.5 s
                with pytest.raises(ResolverError) as error:
                    await resolver.resolve(KEY, 1.5)
        # Sent again after a second of silence rather than waiting it all out.
        assert len(server.udp_queries) == 2
    assert error.value.reason == "timeout"


async def test_udp_nobody_listening_fails_at_once():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with resolver_for(f"udp://127.0.0.1:{port}") as resolver:
        with pytest.raises(ResolverError) as error:
            await resolver.resolve(KEY, 30)
    assert error.value.reason == "unreachable"


# -- tcp:// --------------------------------------------------------------------------------------


async def test_tcp_pipelines_queries_on_one_connection_and_matches_answers_out_of_order():
    async with dns_server() as server:
        server.tcp_answer = "reverse"
        async with resolver_for(f"tcp://127.0.0.1:{server.port}") as resolver:
            answers = {}

            async def ask(name):
                answers[name] = await resolver.resolve((name, dns.rdatatype.A, 1), 5)

            async with trio.open_nursery() as nursery:
                for index in range(10):
                    nursery.start_soon(ask, f"n{index}.example.")
        assert server.tcp_connections == 1
    for name, answer in answers.items():
        assert str(dns.message.from_wire(answer).question[0].name) == name


async def test_tcp_connection_closed_by_the_server_is_opened_again():
    async with dns_server() as server, resolver_for(f"tcp://127.0.0.1:{server.port}") as resolver:
        await resolver.resolve(KEY, 5)
        server.close_tcp_connections()
        await trio.sleep(0.1)  # the resolver's reader sees the close
        answer = await resolver.resolve(KEY, 5)
        assert server.tcp_connections == 2
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_a_connection_the_server_closes_is_reopened_before_the_next_query_once(monkeypatch):
    """A server closing idle connections costs the next query no reconnection; one reopened and then closed
    again without a query in between is not reopened again."""
    monkeypatch.setattr(resolvers, "KEEP_WARM", 1.0)
    async with dns_server() as server, resolver_for(f"tcp://127.0.0.1:{server.port}") as resolver:
        await resolver.resolve(KEY, 5)
        server.close_tcp_connections()
        await trio.sleep(0.2)
        reopened = server.tcp_connections
        server.close_tcp_connections()
        await trio.sleep(0.2)
        unused = server.tcp_connections
        await resolver.resolve(KEY, 5)  # opens one itself
        asked = server.tcp_connections
        await trio.sleep(1.0)  # KEEP_WARM
        server.close_tcp_connections()
        await trio.sleep(0.2)
        cold = server.tcp_connections
    assert (reopened, unused, asked, cold) == (2, 2, 3, 3)


async def test_tcp_server_that_reads_and_says_nothing_times_out():
    async with dns_server() as server:
        server.tcp_answer = False
        async with resolver_for(f"tcp://127.0.0.1:{server.port}") as resolver:
            with trio.fail_after(5), pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 1)
            silent = resolver.sessions.session
            server.tcp_answer = True
            answer = await resolver.resolve(KEY, 5)
    assert error.value.reason == "timeout"
    assert not silent.alive and resolver.sessions.opened == 2  # said nothing since the query: replaced
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_tcp_bounds_the_queries_in_flight_on_a_connection(monkeypatch):
    monkeypatch.setattr(resolvers, "MAX_TCP_IN_FLIGHT", 3)
    async with dns_server() as server:
        server.tcp_answer = False
        async with resolver_for(f"tcp://127.0.0.1:{server.port}") as resolver:
            async with trio.open_nursery() as nursery:
                for index in range(6):
                    nursery.start_soon(resolver.resolve, (f"n{index}.example.", dns.rdatatype.A, 1), 30)
                await trio.testing.wait_all_tasks_blocked(0.2)
                assert len(server.tcp_queries) == 3
                nursery.cancel_scope.cancel()


# -- https:// (DoH) ------------------------------------------------------------------------------


async def test_doh_posts_id_zero_and_returns_the_answer(ca, ca_file):
    async with doh_server(ca) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            answer = await resolver.resolve(KEY, 5)
        headers, body = server.requests[0]
    assert addresses_in(answer) == [ANSWER_ADDRESS]
    assert body[:2] == b"\0\0"
    assert headers[b":method"] == b"POST" and headers[b":path"] == b"/dns-query"
    assert headers[b"content-type"] == b"application/dns-message"
    assert headers[b":authority"] == f"127.0.0.1:{server.port}".encode()


async def test_doh_many_queries_share_one_connection_within_the_servers_stream_limit(ca, ca_file):
    async with doh_server(ca, max_streams=10) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            answers = []

            async def ask(index):
                answers.append(await resolver.resolve((f"n{index}.example.", dns.rdatatype.A, 1), 10))

            async with trio.open_nursery() as nursery:
                for index in range(200):
                    nursery.start_soon(ask, index)
        assert server.connections == 1
        assert 1 < server.most_open <= 10
    assert len(answers) == 200


async def test_doh_certificate_from_another_ca_is_refused(ca, tmp_path):
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with doh_server(ca) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", str(other)) as resolver:
            with pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 5)
    assert error.value.reason == "tls"


@pytest.mark.parametrize(
    "reply, reason",
    [
        ((200, "application/dns-message", b"garbage"), "mismatch"),
        ((503, "text/plain", b"busy"), "http-503"),
        ((200, "text/html", b"<html>"), "content-type"),
        ((200, "application/dns-message", b"\0" * 70000), "oversized"),
        ((200, "application/dns-message", b""), "empty"),
    ],
)
async def test_doh_bad_answers_are_errors_and_the_connection_goes_on(ca, ca_file, reply, reason):
    async with doh_server(ca) as server:
        good = server.respond
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            server.respond = lambda body: reply
            with pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 5)
            server.respond = good
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 1
    assert error.value.reason == reason
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_doh_stream_ids_run_out_is_a_resolver_error_and_the_next_query_opens_a_new_connection(ca, ca_file):
    async with doh_server(ca) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            await resolver.resolve(KEY, 5)
            resolver.sessions.session.client._h2.highest_outbound_stream_id = 2**31 - 1  # the last one used
            with pytest.raises(ResolverError) as error:  # one the next resolver in line is asked instead of
                await resolver.resolve(KEY, 5)
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 2
    assert error.value.reason == "h2-exhausted"
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_doh_goaway_fails_the_queries_in_flight_and_the_next_opens_a_new_connection(ca, ca_file):
    async with doh_server(ca) as server:
        server.goaway_after = 1
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            with pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 5)
            server.goaway_after = None
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 2
    assert error.value.reason == "h2-goaway"
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_doh_stream_reset_fails_that_query(ca, ca_file):
    async with doh_server(ca) as server:
        server.reset = True
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            with pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 5)
    assert error.value.reason == "h2-reset"


async def test_doh_silent_server_times_out_and_the_stream_is_cancelled(ca, ca_file):
    async with doh_server(ca) as server:
        server.respond = lambda body: None
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            with trio.fail_after(5), pytest.raises(ResolverError) as error:
                await resolver.resolve(KEY, 0.5)
            server.respond = lambda body: (200, "application/dns-message", answer_for(body))
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 1
    assert error.value.reason == "timeout"
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_doh_a_connection_gone_silent_is_replaced_once_a_ping_goes_unanswered(ca, ca_file, monkeypatch):
    """Without a FIN or RST (a blackholed tunnel), TCP would hold the dead connection for many minutes."""
    monkeypatch.setattr(resolvers, "PING_WAIT", 0.2)
    async with doh_server(ca) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            await resolver.resolve(KEY, 5)
            server.freeze_open_connections()
            with pytest.raises(ResolverError):
                await resolver.resolve(KEY, 0.3)
            assert resolver.sessions.session.accepting  # the PING has had no time yet
            await trio.sleep(0.25)
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 2
    assert addresses_in(answer) == [ANSWER_ADDRESS]


async def test_doh_server_gone_fails_the_query_and_the_next_reconnects(ca, ca_file):
    async with doh_server(ca) as server:
        async with resolver_for(f"https://127.0.0.1:{server.port}/dns-query", ca_file) as resolver:
            await resolver.resolve(KEY, 5)
            resolver.sessions.session.stream.transport_stream.socket.shutdown(socket.SHUT_RDWR)
            with pytest.raises(ResolverError):
                await resolver.resolve(KEY, 5)
            answer = await resolver.resolve(KEY, 5)
        assert server.connections == 2
    assert addresses_in(answer) == [ANSWER_ADDRESS]


# -- in order, with health ------------------------------------------------------------------------


class Scripted:
    """A resolver that answers, fails or stays silent as told."""

    def __init__(self, url, behaviour="answer", rcode=0):
        self.url, self.behaviour, self.rcode, self.asked = url, behaviour, rcode, 0
        self.timeouts: list[float] = []

    async def resolve(self, key, timeout):
        self.asked += 1
        self.timeouts.append(timeout)
        if self.behaviour == "fail":
            raise ResolverError("scripted", "closed")
        if self.behaviour == "silent":
            await trio.sleep(timeout)
            raise ResolverError("scripted", "timeout")
        response = dns.message.make_response(dns.message.make_query(key[0], key[1]))
        response.set_rcode(self.rcode)
        return response.to_wire()

    async def aclose(self):
        pass


async def test_resolvers_take_the_first_that_answers():
    first, second = Scripted("a", "fail"), Scripted("b")
    answer = await Resolvers([first, second]).resolve(KEY, 5)
    assert dns.message.from_wire(answer).rcode() == 0
    assert (first.asked, second.asked) == (1, 1)


async def test_resolvers_skip_one_that_failed_in_a_row_until_its_time_is_up():
    now = [0.0]
    first, second = Scripted("a", "fail"), Scripted("b")
    chain = Resolvers([first, second], failures=3, clock=lambda: now[0])
    for _ in range(5):
        await chain.resolve(KEY, 5)
    assert first.asked == 3
    now[0] += resolvers.DOWN_FOR
    await chain.resolve(KEY, 5)
    assert first.asked == 4


async def test_resolvers_all_down_are_all_tried():
    first, second = Scripted("a", "fail"), Scripted("b", "fail")
    chain = Resolvers([first, second], failures=1)
    for _ in range(3):
        with pytest.raises(ResolverError):
            await chain.resolve(KEY, 5)
    assert (first.asked, second.asked) == (3, 3)


async def test_resolvers_a_silent_one_leaves_time_for_the_next(autojump_clock):
    first, second = Scripted("a", "silent"), Scripted("b")
    await Resolvers([first, second]).resolve(KEY, 2)
    assert first.timeouts == [1.0] and second.timeouts == [1.0]


async def test_resolvers_servfail_tries_the_next_and_is_passed_on_if_nothing_better():
    first, second = Scripted("a", rcode=2), Scripted("b", rcode=5)
    answer = await Resolvers([first, second]).resolve(KEY, 5)
    assert dns.message.from_wire(answer).rcode() == 5
    first, second = Scripted("a", rcode=2), Scripted("b")
    answer = await Resolvers([first, second]).resolve(KEY, 5)
    assert dns.message.from_wire(answer).rcode() == 0


async def test_resolvers_never_outlast_the_timeout(autojump_clock):
    chain = Resolvers([Scripted("a", "silent"), Scripted("b", "silent"), Scripted("c", "silent")])
    start = trio.current_time()
    with pytest.raises(ResolverError) as error:
        await chain.resolve(KEY, 1.5)
    assert trio.current_time() - start == pytest.approx(1.5)
    assert error.value.reason == "timeout"
