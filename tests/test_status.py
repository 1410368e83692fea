"""The status page's JSON (relay.status): ranking and paging, rates, history, redaction, and its HTTP side."""

import heapq
import ipaddress
import json
from collections import deque
from types import SimpleNamespace

import pytest
import trio

from relay import status as status_module
from relay.config import parse_upstream
from relay.dns.fakeip import FakeIps
from relay.metrics import Metrics, serve_metrics
from relay.net.connection import State
from relay.net.faults import Fault
from relay.net.upstreams import UpstreamState
from relay.status import (
    HISTORY_SAMPLES,
    MAX_LIMIT,
    MAX_OFFSET,
    REFRESH,
    SLICE,
    TOP,
    BadRequest,
    Status,
    parse_query,
    redact_text,
    top_connections,
)
from tests.test_metrics import fetch

PASSWORD = "s3cret-pa55"
AUTH_UPSTREAM = parse_upstream(f"socks5://alice:{PASSWORD}@10.0.0.9:1080")
PLAIN_UPSTREAM = parse_upstream("127.0.0.1:3128")


class FakeConnection:
    """What relay.status reads of a relay.net.connection.Connection."""

    def __init__(self, number, started=0.0, via=PLAIN_UPSTREAM, name=None):
        self.peer = ("192.168.1.10", 40000 + number)
        self.dst = ("203.0.113.5", 443)
        self.name, self.name_from = name, "sni" if name else None
        self.via = via
        self.state = State.RELAYING
        self.started = started


class FakePump:
    def __init__(self):
        self.moved = {}  # connection -> (up, down)

    def counts(self):
        return [(conn, up, down) for conn, (up, down) in self.moved.items()]

    def __len__(self):
        return len(self.moved)


class FakePool:
    def __init__(self, *upstreams):
        self.states = [UpstreamState(upstream, []) for upstream in upstreams]


class FakeConnections:
    def __init__(self, *upstreams):
        self.open = set()
        self.pump = FakePump()
        self.pool = FakePool(*upstreams)
        self.failures = deque(maxlen=100)


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def new_status(*upstreams, dns=None, udp=False):
    metrics = Metrics(version="test", fast_path="python")
    connections = FakeConnections(*(upstreams or (PLAIN_UPSTREAM,)))
    clock, wall = Clock(), Clock(1_700_000_000.0)
    return Status(metrics, connections, dns, udp=udp, clock=clock, wall=wall), connections, clock


def rows(count):
    """Snapshot rows whose rate, age and bytes rank in three different orders."""
    made = []
    for number in range(count):
        conn = FakeConnection(number, started=float((number * 7) % count))
        made.append((conn, number, (number * 3) % count, float(number), 0.0))
    return made


def test_a_page_is_the_top_of_the_ranking():
    snapshot = rows(500)
    page = top_connections(snapshot, 1000.0, sort="rate", limit=10, offset=20)
    assert page["total"] == 500 and page["offset"] == 20 and page["limit"] == 10
    assert [row["rate_up"] for row in page["connections"]] == list(range(479, 469, -1))
    by_age = top_connections(snapshot, 1000.0, sort="age", limit=5)["connections"]
    ages = [row["age"] for row in by_age]
    assert ages == sorted(ages, reverse=True) and ages[0] == 1000.0  # started 0.0: the oldest
    by_bytes = top_connections(snapshot, 1000.0, sort="bytes", limit=3)["connections"]
    totals = [row["up"] + row["down"] for row in by_bytes]
    assert totals == sorted((up + down for _, up, down, _, _ in snapshot), reverse=True)[:3]
    assert top_connections(snapshot, 1000.0, limit=10, offset=495)["connections"][-1]["rate_up"] == 0
    assert top_connections([], 0.0)["connections"] == []


def test_only_the_rows_shown_are_rendered(monkeypatch):
    rendered = []
    real = status_module.connection_row
    monkeypatch.setattr(status_module, "connection_row", lambda row, now: rendered.append(row) or real(row, now))
    top_connections(rows(5000), 10.0, limit=MAX_LIMIT, offset=MAX_OFFSET)
    assert len(rendered) == MAX_LIMIT


def test_query_bounds():
    assert parse_query("") == {"sort": "rate", "limit": 50, "offset": 0}
    assert parse_query(f"sort=age&limit={MAX_LIMIT}&offset={MAX_OFFSET}") == {
        "sort": "age",
        "limit": MAX_LIMIT,
        "offset": MAX_OFFSET,
    }
    for bad in (
        "limit=0",
        f"limit={MAX_LIMIT + 1}",
        f"offset={MAX_OFFSET + 1}",
        "offset=-1",
        "limit=ten",
        "limit=1e3",
        "limit=%EF%BC%91",  # a fullwidth digit: isdigit() says yes, the query says no
        "limit=" + "9" * 40,
        "sort=name",
        "&".join(["a=1"] * 20),
    ):
        with pytest.raises(BadRequest):
            parse_query(bad)


async def test_rates_come_from_the_bytes_since_the_last_read_which_is_shared_for_a_second():
    status, connections, clock = new_status()
    old, new = FakeConnection(1, started=90.0), FakeConnection(2, started=99.0)
    connections.open |= {old, new}
    connections.pump.moved = {old: (1000, 5000)}  # new is not relaying yet: no bytes
    first = {row[0]: row for row in await status.refresh()}
    assert first[old][3:] == (100.0, 500.0)  # first seen: its average since it started 10 s ago
    assert first[new][1:] == (0, 0, 0.0, 0.0)
    connections.pump.moved = {old: (3000, 5000), new: (0, 800)}
    clock.now += REFRESH / 2
    assert await status.refresh() is status.rows and first[old] in status.rows  # not read again yet
    clock.now += REFRESH * 1.5  # 2 s after the first read
    second = {row[0]: row for row in await status.refresh()}
    assert second[old][1:] == (3000, 5000, 1000.0, 0.0) and second[new][4] == 400.0
    assert status.totals == (3000, 5800, 1000.0, 400.0)
    status.metrics.bytes_up = 10  # of the connections closed
    summary = await status.summary_json()
    assert (summary["open"], summary["bytes_up"], summary["bytes_down"], summary["rate_down"]) == (2, 3010, 5800, 400)
    connections.open.discard(old)
    clock.now += REFRESH
    assert [row[0] for row in await status.refresh()] == [new] and old not in status.seen


async def test_upstream_history_samples_health_and_mean_handshake_time():
    status, connections, clock = new_status(PLAIN_UPSTREAM, AUTH_UPSTREAM)
    metrics = status.metrics
    for seconds in (0.010, 0.030):
        metrics.handshake_done(str(AUTH_UPSTREAM), seconds)
    status.sample()
    connections.pool.states[1].healthy = False
    status.sample()  # no handshake since the last sample
    metrics.handshake_done(str(AUTH_UPSTREAM), 0.1)
    status.sample()
    plain, auth = (await status.upstreams_json())["upstreams"]
    assert [point[1:] for point in auth["history"]] == [[True, 20.0], [False, None], [False, 100.0]]
    assert [point[1:] for point in plain["history"]] == [[True, None]] * 3
    assert auth["handshakes"] == 3 and auth["handshake_mean_ms"] == pytest.approx(46.7, abs=0.1)
    assert auth["upstream"] == "socks5://alice:***@10.0.0.9:1080" and not auth["healthy"]
    for _ in range(HISTORY_SAMPLES + 10):
        status.sample()
    assert len((await status.upstreams_json())["upstreams"][0]["history"]) == HISTORY_SAMPLES
    connections.pool = FakePool(AUTH_UPSTREAM)  # a reload dropped the other one
    status.sample()
    assert list(status.history) == ["socks5://alice:***@10.0.0.9:1080"]


async def test_upstreams_count_their_connections_and_failed_attempts():
    status, connections, _ = new_status(PLAIN_UPSTREAM, AUTH_UPSTREAM)
    connections.open |= {FakeConnection(n, via=AUTH_UPSTREAM) for n in range(3)}
    connections.open.add(FakeConnection(9, via=None))  # still sniffing: no upstream yet
    status.metrics.attempt_failed(str(AUTH_UPSTREAM), "target")
    plain, auth = (await status.upstreams_json())["upstreams"]
    assert plain["connections"] == 0 and auth["connections"] == 3
    assert auth["attempts_failed"] == {"target": 1} and plain["attempts_failed"] == {}


async def test_no_password_in_any_answer():
    status, connections, _ = new_status(AUTH_UPSTREAM)
    conn = FakeConnection(1, via=AUTH_UPSTREAM, name="example.org")
    connections.open.add(conn)
    connections.pump.moved = {conn: (10, 20)}
    status.metrics.handshake_done(str(AUTH_UPSTREAM), 0.02)
    status.metrics.attempt_failed(str(AUTH_UPSTREAM), "proxy")
    error = f"the proxy socks5://alice:{PASSWORD}@10.0.0.9:1080 refused"
    connections.failures.append(
        (1_699_999_990.0, conn.peer, conn.dst, "example.org", AUTH_UPSTREAM, "refused:socks-auth", error, Fault.PROXY)
    )
    status.sample()
    targets = (
        b"/api/connections",
        b"/api/upstreams",
        b"/api/failures",
        b"/api/summary",
        b"/api/dns",
        b"/api/udp",
        b"/",
    )
    bodies = [(await status.respond(target))[2] for target in targets]
    assert all(PASSWORD.encode() not in body for body in bodies)
    [row] = json.loads(bodies[0])["connections"]
    assert row["upstream"] == "socks5://alice:***@10.0.0.9:1080" and row["name"] == "example.org"
    [failure] = json.loads(bodies[2])["failures"]
    assert failure == {
        "time": 1_699_999_990.0,
        "ago": 10.0,
        "client": "192.168.1.10:40001",
        "name": "example.org",
        "destination": "203.0.113.5:443",
        "upstream": "socks5://alice:***@10.0.0.9:1080",
        "reason": "socks-auth",
        "fault": "proxy",
        "error": "the proxy socks5://alice:***@10.0.0.9:1080 refused",
    }


def test_redact_text():
    assert redact_text(None) is None
    assert redact_text("http://u:p@h:1 and socks5://x:y:z@h2") == "http://u:***@h:1 and socks5://x:***@h2"
    assert redact_text("no url here: a:b@c") == "no url here: a:b@c"
    assert len(redact_text("x" * 10_000)) == status_module.MAX_TEXT


def test_failures_newest_first_and_bounded():
    status, connections, _ = new_status()
    for number in range(100):
        connections.failures.append(
            (1_699_999_000.0 + number, ("10.0.0.1", number), None, None, None, "refused:loop", None, None)
        )
    shown = status.failures_json()["failures"]
    assert len(shown) == status_module.FAILURES_SHOWN and shown[0]["client"] == "10.0.0.1:99"
    assert shown[0]["destination"] is None and shown[0]["reason"] == "loop"


class FakeDns:
    def __init__(self):
        self.cache = type("Cache", (), {"__len__": lambda self: 2, "max_entries": 4096})()
        self.config = type("Config", (), {"dns_mode": "fake-ip"})()


def test_dns_use_only_when_enabled():
    status, _, _ = new_status()
    assert status.dns_json() == {"enabled": False}
    status, _, _ = new_status(dns=FakeDns())
    metrics = status.metrics
    metrics.fake_ips = FakeIps([ipaddress.ip_network("198.18.0.0/30")], [])
    metrics.dns_query("A", "cache")
    metrics.dns_query("AAAA", "cache")
    metrics.dns_query("A", "upstream")
    metrics.dns_upstream_answered(0.05)
    metrics.dns_upstream_failed("timeout")
    metrics.fake_ips.families[4].address_of("example.org")
    assert status.dns_json() == {
        "enabled": True,
        "mode": "fake-ip",
        "cache": {"entries": 2, "max": 4096},
        "queries": {"cache": 2, "upstream": 1},
        "upstream_answers": 1,
        "upstream_mean_ms": 50.0,
        "upstream_failures": {"timeout": 1},
        "fake_ips": {"ipv4": {"in_use": 1, "capacity": 2}},
        "fake_ips_recycled": 0,
    }


def test_udp_sessions_datagrams_and_drops_only_when_relayed():
    status, _, _ = new_status()
    assert status.udp_json() == {"enabled": False}
    status, _, _ = new_status(udp=True)
    metrics = status.metrics
    metrics.udp_session_opened()
    metrics.udp_session_opened()
    metrics.udp_session_ended("idle")
    metrics.udp_relayed("up", 3, 300)
    metrics.udp_relayed("down", 2, 1200)
    metrics.udp_dropped("unasked", 4)
    metrics.udp_dropped("reply-socket")
    assert status.udp_json() == {
        "enabled": True,
        "sessions": 1,
        "ended": {"idle": 1},
        "datagrams": {"up": 3, "down": 2},
        "bytes": {"up": 300, "down": 1200},
        "dropped": {"reply-socket": 1, "unasked": 4},
    }


async def test_served_beside_the_metrics(nursery):
    status, connections, _ = new_status(AUTH_UPSTREAM)
    long_name = "n" * 250 + ".org"
    for number in range(3000):
        conn = FakeConnection(number, via=AUTH_UPSTREAM, name=long_name)
        connections.open.add(conn)
        connections.pump.moved[conn] = (number, number)
    address = await nursery.start(serve_metrics, status.metrics, "127.0.0.1", 0, status)
    response, body = await fetch(address, target=b"/")
    headers = dict(response.headers)
    assert response.status_code == 200 and headers[b"content-type"] == b"text/html; charset=utf-8"
    assert b"default-src 'none'" in headers[b"content-security-policy"] and b"<script>" in body
    assert b"http" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # nothing fetched from elsewhere
    response, body = await fetch(address, target=f"/api/connections?limit={MAX_LIMIT}&sort=bytes".encode())
    page = json.loads(body)
    assert response.status_code == 200 and page["total"] == 3000 and len(page["connections"]) == MAX_LIMIT
    assert page["connections"][0]["up"] == 2999 and page["connections"][0]["name"] == long_name[:200]
    assert len(body) < MAX_LIMIT * 600  # bounded by the page, not by the 3000 connections
    response, body = await fetch(address, target=b"/api/connections?limit=100000")
    assert response.status_code == 400 and b"limit" in body
    response, body = await fetch(address, method=b"HEAD", target=b"/api/upstreams")
    assert response.status_code == 200 and body == b""
    for target in (b"/api/nothing", b"/index.html", b"/api"):
        response, body = await fetch(address, target=target)
        assert response.status_code == 404 and b"/api/connections" in body
    response, body = await fetch(address)
    assert response.status_code == 200 and b"relay_info" in body
    with trio.fail_after(5):  # the history is sampled at once, then every HISTORY_INTERVAL
        while not status.history:
            await trio.sleep(0.01)


async def test_a_read_of_many_connections_yields_between_slices_and_is_shared(nursery):
    status, connections, _ = new_status()
    for number in range(5 * SLICE + 7):
        conn = FakeConnection(number, started=float(number % 13))
        connections.open.add(conn)
        connections.pump.moved[conn] = ((number * 7919) % 100_003, number)
    reads = []
    counts = connections.pump.counts
    connections.pump.counts = lambda: reads.append(1) or counts()
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await trio.sleep(0)

    nursery.start_soon(ticker)
    await trio.sleep(0)
    answers = []

    async def ask():
        answers.append(await status.refresh())

    async with trio.open_nursery() as asking:
        for _ in range(3):
            asking.start_soon(ask)
    assert len(reads) == 1 and answers[0] is answers[1] is answers[2] and len(answers[0]) == 5 * SLICE + 7
    assert len(ticks) >= 6  # the event loop went round between slices
    ticks.clear()
    ranked = await status.ranking("bytes")
    assert len(ticks) >= 5 and len(ranked) == TOP
    assert ranked == heapq.nlargest(TOP, answers[0], key=lambda row: row[1] + row[2])
    assert await status.ranking("bytes") is ranked  # once per snapshot
    page = await status.connections_json("sort=bytes&limit=3&offset=1")
    assert page["total"] == 5 * SLICE + 7 and [row["up"] + row["down"] for row in page["connections"]] == [
        row[1] + row[2] for row in ranked[1:4]
    ]


async def test_each_ssh_tunnel_of_an_upstream_has_its_row_and_history():
    status, connections, _ = new_status(AUTH_UPSTREAM)
    lanes = [UpstreamState(AUTH_UPSTREAM, [], SimpleNamespace(up=True, label=f"{AUTH_UPSTREAM}#{n}")) for n in (1, 2)]
    connections.pool.states = lanes
    lanes[0].active, lanes[1].healthy = 2, False
    status.metrics.handshake_done(str(AUTH_UPSTREAM), 0.040)
    status.sample()
    first, second = (await status.upstreams_json())["upstreams"]
    assert [first["upstream"], second["upstream"]] == [f"socks5://alice:***@10.0.0.9:1080#{n}" for n in (1, 2)]
    assert (first["relaying"], second["relaying"]) == (2, 0)
    # The upstream's handshakes are the lanes' together: each sample shows their mean once per lane.
    assert [point[1:] for point in first["history"]] == [[True, 40.0]]
    assert [point[1:] for point in second["history"]] == [[False, 40.0]]
