"""The live status page on the metrics listener: ``GET /`` and the JSON it polls under ``/api/``.

Read-only, and read on demand: relaying does no work for it beyond keeping the set of open
connections and the latest refused ones (relay.net.connections). What a request costs is
bounded whatever the number of connections: the byte counts of every open connection are
read from the engine at most once per REFRESH whoever asks, SLICE connections per turn of the
event loop (so the relaying never waits long for it), with the totals the page shows; each
ranking it asks for is the top TOP of that snapshot (heapq.nlargest, slice by slice), made
once per snapshot, never all of them sorted; an answer is a slice of it. Upstream URLs are
shown as in the metrics, their password as ``***``; an error's text goes through
redact_text() too.

Names are what clients looked up: they are shown here, to whoever can reach the metrics
listener (an operator's address, loopback by default), and never logged by this module.
"""

import heapq
import inspect
import json
import math
import re
import time
from collections import deque
from urllib.parse import parse_qs

import trio

from relay.addresses import format_address
from relay.config import redact_url
from relay.metrics import read_conntrack
from relay.status_page import PAGE

REFRESH = 1.0  # seconds: the connections' byte counts are read at most this often, whoever asks
HISTORY_INTERVAL = 5.0  # seconds between two samples of each upstream's health and handshake time
HISTORY_SAMPLES = 120  # ten minutes of them
DEFAULT_LIMIT = 50
MAX_LIMIT = 200  # connections in one answer
MAX_OFFSET = 1000  # the top MAX_OFFSET + MAX_LIMIT at most: paging deeper costs more than it tells
TOP = MAX_OFFSET + MAX_LIMIT
SLICE = 1000  # connections read, or ranked, per turn of the event loop
FAILURES_SHOWN = 50
MAX_TEXT = 200  # characters of a name or an error shown
SORTS = ("rate", "age", "bytes")
MAX_QUERY_FIELDS = 8

JSON = b"application/json"
HTML = b"text/html; charset=utf-8"
# Nothing is fetched from anywhere but here, and the page's own inline script and style are all it runs.
PAGE_HEADERS = [
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
]
API_HEADERS = [(b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff")]

# user:password@ in a URL anywhere in a text: the password goes.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s@]*@")


class BadRequest(ValueError):
    """A query the API does not take: answered 400 with this text."""


def redact_text(text: str | None) -> str | None:
    """Free text (an error) with any URL's password as ***, cut to MAX_TEXT characters."""
    if text is None:
        return None
    return _URL_PASSWORD.sub(r"\1:***@", text)[:MAX_TEXT]


def _address(address) -> str | None:
    return format_address(address) if address else None


def _upstream(via) -> str | None:
    return redact_url(str(via)) if via is not None else None


def _cut(text: str | None) -> str | None:
    return text[:MAX_TEXT] if text else text


def connection_row(row: tuple, now: float) -> dict:
    """One connection as JSON: bytes, bytes/s, seconds; ``row`` is a snapshot's (connection, up, down, rates)."""
    conn, up, down, rate_up, rate_down = row
    return {
        "client": _address(conn.peer),
        "name": _cut(conn.name),
        "name_from": conn.name_from,
        "destination": _address(conn.dst),
        "upstream": _upstream(conn.via),
        "state": conn.state.value,
        "up": up,
        "down": down,
        "rate_up": round(rate_up),
        "rate_down": round(rate_down),
        "age": round(now - conn.started, 1),
    }


def failure_row(failure: tuple, wall: float) -> dict:
    when, peer, dst, name, via, ended, detail, fault = failure
    return {
        "time": round(when, 3),
        "ago": round(wall - when, 1),
        "client": _address(peer),
        "name": _cut(name),
        "destination": _address(dst),
        "upstream": _upstream(via),
        "reason": ended.partition(":")[2],
        "fault": fault.value if fault is not None else None,
        "error": redact_text(detail),
    }


def _sort_key(sort: str):
    if sort == "rate":
        return lambda row: row[3] + row[4]
    if sort == "bytes":
        return lambda row: row[1] + row[2]
    return lambda row: -row[0].started  # age: the oldest first


def top_connections(rows: list, now: float, sort: str = "rate", limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict:
    """A page of the snapshot's connections, ranked by ``sort``, without sorting them all."""
    ranked = heapq.nlargest(offset + limit, rows, key=_sort_key(sort))
    return page_of(ranked, len(rows), now, sort, limit, offset)


def page_of(ranked: list, total: int, now: float, sort: str, limit: int, offset: int) -> dict:
    """The page at ``offset`` of ``ranked`` (best first): only its rows are rendered."""
    return {
        "total": total,
        "sort": sort,
        "offset": offset,
        "limit": limit,
        "connections": [connection_row(row, now) for row in ranked[offset : offset + limit]],
    }


def parse_query(query: str) -> dict:
    """``sort``, ``limit`` and ``offset`` of /api/connections, checked against their bounds."""
    try:
        fields = parse_qs(query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise BadRequest("too many query fields") from None
    sort = fields.get("sort", ["rate"])[-1]
    if sort not in SORTS:
        raise BadRequest(f"sort is one of {', '.join(SORTS)}")
    limit = _number(fields, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _number(fields, "offset", 0, 0, MAX_OFFSET)
    return {"sort": sort, "limit": limit, "offset": offset}


def _number(fields: dict, key: str, default: int, low: int, high: int) -> int:
    text = fields.get(key, [str(default)])[-1]
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and low <= int(text) <= high):
        raise BadRequest(f"{key} is a whole number from {low} to {high}")
    return int(text)


class Status:
    """What the page shows, read from the running relay: its Connections, metrics, DNS service and
    whether it relays UDP."""

    def __init__(self, metrics, connections, dns=None, *, udp=False, clock=time.monotonic, wall=time.time):
        self.metrics, self.connections, self.dns, self.udp = metrics, connections, dns, udp
        self.clock, self.wall = clock, wall  # clock: the one Connection.started is on
        self.started = wall()
        self.taken = -math.inf
        self.refreshing: trio.Event | None = None  # set when the read under way is done
        self.rows: list[tuple] = []  # (connection, up, down, rate up, rate down) as last read
        self.seen: dict = {}  # connection -> (up, down) as last read, for its rate
        self.rankings: dict[str, list[tuple]] = {}  # sort -> the top TOP of rows
        self.totals = (0, 0, 0.0, 0.0)  # of rows: bytes up, down, rates up, down
        self.by_upstream: dict[str, int] = {}  # of rows: connections by upstream label
        self.history: dict[str, deque] = {}  # upstream label -> (time, healthy, mean handshake ms or None)
        self.handshakes_seen: dict[str, tuple[int, float]] = {}  # label -> (count, total) at the last sample

    # -- the connections ---------------------------------------------------------------------------------------

    async def refresh(self) -> list[tuple]:
        """Every open connection with its bytes and rates, read anew if the last read is REFRESH old
        (one read at a time: a request during one waits for it), SLICE at a time."""
        while self.refreshing is not None:
            await self.refreshing.wait()
        now = self.clock()
        if now - self.taken < REFRESH:
            return self.rows
        self.refreshing = trio.Event()
        try:
            await self._read(now)
        finally:
            self.refreshing.set()
            self.refreshing = None
        return self.rows

    async def _read(self, now: float) -> None:
        relayed = self.connections.pump.counts()  # one pass in C
        counts = {}
        for start in range(0, len(relayed), SLICE):
            await trio.lowlevel.checkpoint()
            counts.update((token, (up, down)) for token, up, down in relayed[start : start + SLICE])
        conns = list(self.connections.open)
        elapsed, previous = now - self.taken, self.seen
        rows, seen, by_via = [], {}, {}
        total_up = total_down = 0
        rate_up = rate_down = 0.0
        for start in range(0, len(conns), SLICE):
            await trio.lowlevel.checkpoint()
            for conn in conns[start : start + SLICE]:
                up, down = counts.get(conn, (0, 0))
                before = previous.get(conn)
                if before is None:  # new since the last read: its average so far
                    span, before = max(now - conn.started, 1e-3), (0, 0)
                else:
                    span = elapsed
                row = (conn, up, down, (up - before[0]) / span, (down - before[1]) / span)
                rows.append(row)
                seen[conn] = (up, down)
                total_up, total_down, rate_up, rate_down = (
                    total_up + up,
                    total_down + down,
                    rate_up + row[3],
                    rate_down + row[4],
                )
                by_via[conn.via] = by_via.get(conn.via, 0) + 1
        by_upstream: dict[str, int] = {}
        for via, number in by_via.items():  # as many as upstreams (a reload may leave old ones)
            if via is not None:
                label = _upstream(via)
                by_upstream[label] = by_upstream.get(label, 0) + number
        self.rows, self.seen, self.taken = rows, seen, now
        self.rankings = {}
        self.totals = (total_up, total_down, rate_up, rate_down)
        self.by_upstream = by_upstream

    async def ranking(self, sort: str) -> list[tuple]:
        """The snapshot's top TOP by ``sort``: made once per snapshot, SLICE rows per turn of the event loop."""
        rows = await self.refresh()
        ranked = self.rankings.get(sort)
        if ranked is None:
            key, ranked = _sort_key(sort), []
            for start in range(0, len(rows), SLICE):
                await trio.lowlevel.checkpoint()
                ranked = heapq.nlargest(TOP, ranked + rows[start : start + SLICE], key=key)
            if self.rows is rows:  # no newer snapshot meanwhile
                self.rankings[sort] = ranked
        return ranked

    async def connections_json(self, query: str) -> dict:
        asked = parse_query(query)
        ranked = await self.ranking(asked["sort"])
        return page_of(ranked, len(self.rows), self.clock(), **asked)

    # -- the upstreams -------------------------------------------------------------------------------------------

    def sample(self) -> None:
        """One point of each upstream's history: health now, and the mean handshake time since the last."""
        handshakes = self.metrics.handshakes
        now = round(self.wall(), 1)
        current, means = set(), {}
        for state in self.connections.pool.states:
            label = redact_url(str(state.upstream))
            if label not in means:  # once per upstream, whose ssh tunnels (lanes) share its handshake figures
                histogram = handshakes.get(label)
                count, total = (sum(histogram.counts), histogram.total) if histogram else (0, 0.0)
                count_before, total_before = self.handshakes_seen.get(label, (0, 0.0))
                self.handshakes_seen[label] = (count, total)
                made = count - count_before
                means[label] = round((total - total_before) / made * 1000, 1) if made > 0 else None
            lane = redact_url(state.label)
            current.add(lane)
            history = self.history.setdefault(lane, deque(maxlen=HISTORY_SAMPLES))
            history.append((now, state.usable, means[label]))
        for lane in set(self.history) - current:  # gone with a reload
            del self.history[lane]
        for label in set(self.handshakes_seen) - set(means):
            del self.handshakes_seen[label]

    async def keep_history(self) -> None:
        while True:
            self.sample()
            await trio.sleep(HISTORY_INTERVAL)

    async def upstreams_json(self) -> dict:
        metrics = self.metrics
        await self.refresh()
        upstreams = []
        for state in self.connections.pool.states:
            label = redact_url(str(state.upstream))
            histogram = metrics.handshakes.get(label)
            count = sum(histogram.counts) if histogram else 0
            failed: dict[str, int] = {}
            for (upstream, fault), number in metrics.attempts_failed.items():
                if upstream == label:
                    failed[fault] = number
            lane = redact_url(state.label)
            upstreams.append(
                {
                    "upstream": lane,
                    "healthy": state.healthy,
                    "usable": state.usable,
                    "tunnel": None if state.tunnel is None else ("up" if state.tunnel.up else "down"),
                    "failures_in_a_row": state.failures,
                    "connections": self.by_upstream.get(label, 0),
                    "relaying": state.active,
                    "handshakes": count,
                    "handshake_mean_ms": round(histogram.total / count * 1000, 1) if count else None,
                    "attempts_failed": failed,
                    "history": [list(point) for point in self.history.get(lane, ())],
                }
            )
        return {"interval": HISTORY_INTERVAL, "upstreams": upstreams}

    # -- DNS, failures, the whole ------------------------------------------------------------------------------------

    def dns_json(self) -> dict:
        metrics, fake_ips = self.metrics, self.metrics.fake_ips
        if self.dns is None and fake_ips is None:
            return {"enabled": False}
        answer: dict = {"enabled": True}
        if self.dns is not None:
            cache = self.dns.cache
            outcomes: dict[str, int] = {}
            for (_, outcome), number in metrics.dns_queries.items():
                outcomes[outcome] = outcomes.get(outcome, 0) + number
            upstream = metrics.dns_upstream
            answered = sum(upstream.counts)
            answer.update(
                mode=self.dns.config.dns_mode,
                cache={"entries": len(cache), "max": cache.max_entries},
                queries=outcomes,
                upstream_answers=answered,
                upstream_mean_ms=round(upstream.total / answered * 1000, 1) if answered else None,
                upstream_failures=dict(metrics.dns_upstream_failures),
            )
        if fake_ips is not None:
            answer["fake_ips"] = {
                f"ipv{version}": {"in_use": len(family), "capacity": family.capacity}
                for version, family in sorted(fake_ips.families.items())
            }
            answer["fake_ips_recycled"] = fake_ips.recycled()
        return answer

    def udp_json(self) -> dict:
        if not self.udp:
            return {"enabled": False}
        metrics = self.metrics
        return {
            "enabled": True,
            "sessions": metrics.udp_sessions_active,
            "ended": dict(sorted(metrics.udp_sessions_ended.items())),
            "datagrams": dict(metrics.udp_datagrams),
            "bytes": dict(metrics.udp_bytes),
            "dropped": dict(sorted(metrics.udp_drops.items())),
        }

    def failures_json(self) -> dict:
        wall = self.wall()
        latest = list(self.connections.failures)[-FAILURES_SHOWN:]
        return {"failures": [failure_row(failure, wall) for failure in reversed(latest)]}

    async def summary_json(self) -> dict:
        metrics = self.metrics
        rows = await self.refresh()
        up, down, rate_up, rate_down = self.totals
        conntrack = read_conntrack(metrics.conntrack_dir)
        return {
            "version": metrics.version,
            "fast_path": metrics.fast_path,
            "uptime": round(self.wall() - self.started),
            "accepted": metrics.accepted,
            "open": len(rows),
            "relaying": len(self.connections.pump),
            "bytes_up": metrics.bytes_up + up,
            "bytes_down": metrics.bytes_down + down,
            "rate_up": round(rate_up),
            "rate_down": round(rate_down),
            "refused": sum(metrics.failed.values()),
            "conntrack": {"entries": conntrack[0], "max": conntrack[1]} if conntrack else None,
        }

    # -- HTTP ----------------------------------------------------------------------------------------------------

    async def respond(self, target: bytes) -> tuple[int, bytes, bytes, list] | None:
        """(status, content type, body, extra headers) for a GET of ``target``; None if it is not ours."""
        path, _, query = target.decode("ascii", "replace").partition("?")
        if path == "/":
            return 200, HTML, PAGE, PAGE_HEADERS
        answers = {
            "/api/connections": lambda: self.connections_json(query),
            "/api/upstreams": self.upstreams_json,
            "/api/dns": self.dns_json,
            "/api/udp": self.udp_json,
            "/api/failures": self.failures_json,
            "/api/summary": self.summary_json,
        }  # each an async or a plain function
        answer = answers.get(path)
        if answer is None:
            return None
        try:
            document = answer()
            if inspect.isawaitable(document):
                document = await document
        except BadRequest as exc:
            return 400, b"text/plain; charset=utf-8", f"{exc}\n".encode(), API_HEADERS
        # ensure_ascii: whatever a client named, the body is plain ASCII.
        return 200, JSON, json.dumps(document, separators=(",", ":")).encode(), API_HEADERS
