"""The DNS resolvers against the lab's unbound on far: DoH and DNS over TCP through squid (via
ssh -L) and dante, plain DNS over UDP straight from the router. unbound listens on far's server-side
address, which the router cannot reach: only the proxies can.

The resolvers run in this process, in a thread that joined the router's namespace."""

import statistics
import time

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trio

from relay.dns.resolvers import ResolverError
from relay.lab import ADDR
from relay.lab.netns import run_in_netns
from tests.dnsresolve.servers import resolver_for
from tests.e2e.conftest import UPSTREAMS

A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
SILENT_PORT = 5353
TIMEOUT = 2.0


def in_router(lab, scenario, timeout: float = 120):
    """``trio.run(scenario)`` with every socket it makes in the router's namespace."""
    return run_in_netns(lab.ns("router"), lambda: trio.run(scenario), timeout=timeout)


def records(answer: bytes) -> tuple[str, list[str]]:
    message = dns.message.from_wire(answer)
    return dns.rcode.to_text(message.rcode()), sorted(rdata.to_text() for rrset in message.answer for rdata in rrset)


def established_to(lab, address: str, port: int) -> int:
    """TCP connections established to address:port, seen on far."""
    out = lab.run("far", ["ss", "-Htn", "state", "established", f"( src {address} and sport = :{port} )"]).stdout
    return len(out.splitlines())


@pytest.mark.parametrize("proxy", ["squid-via-ssh-L", "dante"])
@pytest.mark.parametrize("scheme", ["https", "tcp"])
def test_answers_come_through_the_proxy_as_unbound_holds_them(lab, unbound, proxy, scheme):
    url = unbound.doh_url if scheme == "https" else f"tcp://{unbound.address}:53"

    async def scenario():
        async with resolver_for(url, unbound.ca_file, UPSTREAMS[proxy]) as doh:
            return [
                records(await doh.resolve(key, TIMEOUT))
                for key in [("far-only.example.", A, 1), ("Far-Only.EXAMPLE.", AAAA, 1), ("nx.example.", A, 1)]
            ]

    assert in_router(lab, scenario) == [
        ("NOERROR", [ADDR.server4]),
        ("NOERROR", [ADDR.server6]),
        ("NXDOMAIN", []),
    ]


def test_udp_goes_straight_from_the_router(lab, unbound):
    async def scenario():
        async with resolver_for(f"udp://{unbound.direct_address}:53", unbound.ca_file, "direct") as udp:
            return [records(await udp.resolve(("far-only.example.", A, 1), TIMEOUT)) for _ in range(3)]

    assert in_router(lab, scenario) == [("NOERROR", [ADDR.server4])] * 3


def test_doh_answers_200_concurrent_queries_over_one_connection(lab, unbound, figures):
    """Through squid, as the default --upstream of most routers would be."""

    async def scenario():
        async with resolver_for(unbound.doh_url, unbound.ca_file, UPSTREAMS["squid-via-ssh-L"]) as doh:
            await doh.resolve(("server.example.", A, 1), TIMEOUT)  # the connection, opened
            latencies = []
            for _ in range(200):
                start = time.perf_counter()
                await doh.resolve(("far-only.example.", A, 1), TIMEOUT)
                latencies.append(time.perf_counter() - start)
            answers = []

            async def ask(index):
                answers.append(records(await doh.resolve((f"n{index}.example.", A, 1), 10)))

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(200):
                    nursery.start_soon(ask, index)
            concurrent = time.perf_counter() - start
            return latencies, answers, concurrent, doh.sessions.opened, established_to(lab, unbound.address, 443)

    latencies, answers, concurrent, opened, connections = in_router(lab, scenario)
    assert answers == [("NXDOMAIN", [])] * 200
    assert opened == 1 and connections == 1
    figures("DoH via squid, p50 of 200 sequential queries", f"{statistics.median(latencies) * 1000:.2f} ms")
    figures("DoH via squid, 200 concurrent queries", f"{concurrent * 1000:.0f} ms")


def test_unbound_killed_then_back_fails_queries_then_recovers(lab, unbound):
    async def scenario():
        async with resolver_for(unbound.doh_url, unbound.ca_file, UPSTREAMS["dante"]) as doh:
            before = records(await doh.resolve(("far-only.example.", A, 1), TIMEOUT))
            unbound.kill()
            with trio.fail_after(3 * TIMEOUT):  # never hangs: each try ends within its timeout
                errors = []
                for _ in range(3):
                    with pytest.raises(ResolverError) as error:
                        await doh.resolve(("far-only.example.", A, 1), TIMEOUT)
                    errors.append(error.value.reason)
            unbound.start()
            after = records(await doh.resolve(("far-only.example.", A, 1), TIMEOUT))
            return before, errors, after, doh.sessions.opened

    before, errors, after, opened = in_router(lab, scenario)
    assert before == after == ("NOERROR", [ADDR.server4])
    assert len(errors) == 3
    assert opened >= 2


@pytest.mark.parametrize("scheme", ["tcp", "https"])
def test_a_resolver_that_never_answers_times_out(lab, unbound, scheme):
    """A listener on far that takes the connection, reads, and says nothing."""
    listener = lab.socket("far")
    listener.bind((ADDR.far_server_side4, SILENT_PORT))
    listener.listen(8)
    url = f"{scheme}://{ADDR.far_server_side4}:{SILENT_PORT}" + ("/dns-query" if scheme == "https" else "")

    async def scenario():
        async with resolver_for(url, unbound.ca_file, UPSTREAMS["dante"]) as silent:
            with trio.fail_after(3 * TIMEOUT), pytest.raises(ResolverError) as error:
                await silent.resolve(("far-only.example.", A, 1), TIMEOUT)
            return error.value.reason

    try:
        assert in_router(lab, scenario) == "timeout"
    finally:
        listener.close()
