"""Prometheus metrics: counters kept by the relay, served as text format 0.0.4 over HTTP.

Everything runs in the one Trio thread, so the hot-path updates are plain
attribute and dict operations with no locking.

Label values come from callers, who must pass redacted upstream URLs
(``http://user:***@host:port``); the upstream and tunnel labels are redacted
again here so that a slip upstream still never exposes a password.
"""

import functools
from bisect import bisect_left
from collections.abc import Callable

import h11
import trio

from relay.config import redact_url
from relay.logs import RateLimited
from relay.net.listener import accept_loop, open_listener

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKET_LABELS = tuple(f"{bound:g}" for bound in HANDSHAKE_BUCKETS) + ("+Inf",)
REFUSED_PREFIX = "refused:"

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PLAIN_TEXT = b"text/plain; charset=utf-8"
NOT_FOUND = b"not found, try / (the status page), /api/connections, /api/upstreams or /metrics\n"
MAX_REQUEST_HEAD = 8192
RECEIVE_SIZE = 8192
# A scrape is a few round trips; a slot held longer than this is a stuck or hostile client.
CONNECTION_TIMEOUT = 10.0
MAX_CONCURRENT_SCRAPES = 64
CONNTRACK_DIR = "/proc/sys/net/netfilter"


def read_conntrack(directory: str = CONNTRACK_DIR) -> tuple[int, int] | None:
    """(entries, maximum) of the kernel's connection tracking in this namespace; None where it is not loaded.
    A full table drops new connections' packets before the relay ever sees them."""
    try:
        with open(f"{directory}/nf_conntrack_count") as count, open(f"{directory}/nf_conntrack_max") as maximum:
            return int(count.read()), int(maximum.read())
    except (OSError, ValueError):
        return None


def count_tasks() -> int:
    """Every task under Trio's root task (0 outside Trio, e.g. in unit tests of render())."""
    try:
        pending = [trio.lowlevel.current_root_task()]
    except RuntimeError:
        return 0
    count = 0
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def _label(value: str) -> str:
    """A label value, quoted and escaped as the text format requires."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _sample(name: str, labels: dict[str, str], value) -> str:
    if not labels:
        return f"{name} {value}"
    pairs = ",".join(f"{key}={_label(text)}" for key, text in labels.items())
    return f"{name}{{{pairs}}} {value}"


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self):
        self.counts = [0] * len(_BUCKET_LABELS)  # per bucket, not cumulative: render() adds them up
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(HANDSHAKE_BUCKETS, value)] += 1
        self.total += value


class Metrics:
    """The relay's counters and gauges; ``render()`` gives the exposition text."""

    def __init__(self, *, version: str, fast_path: str):
        self.version = version
        self.fast_path = fast_path
        self.accepted = 0
        self.active = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.ended: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.named: dict[str, int] = {}  # connections opened by a name, by where it came from
        self.attempts_failed: dict[tuple[str, str], int] = {}
        self.handshakes: dict[str, _Histogram] = {}
        self.upstream_healthy: dict[str, bool] = {}
        self.tunnel_restarts: dict[tuple[str, str], int] = {}
        self.dns_queries: dict[tuple[str, str], int] = {}
        self.preconnected: dict[str, int] = {}
        self.dns_upstream_failures: dict[str, int] = {}
        self.dns_upstream = _Histogram()
        self.fake_ips = None  # the fake-IP pool (relay.dns.fakeip) in fake-ip mode, for its use
        self.udp_sessions_active = 0
        self.udp_sessions_ended: dict[str, int] = {}
        self.udp_datagrams = {"up": 0, "down": 0}
        self.udp_bytes = {"up": 0, "down": 0}
        self.udp_drops: dict[str, int] = {}
        self.conntrack_dir = CONNTRACK_DIR
        # Called before each render, to bring in what is counted elsewhere (the UDP engine's thread).
        self.collectors: list[Callable[[], None]] = []

    def connection_accepted(self) -> None:
        self.accepted += 1
        self.active += 1

    def connection_closed(self, ended: str, sent_up: int, sent_down: int) -> None:
        """``ended`` says how: "closed", "client-reset", ... or "refused:REASON", which also counts as a failure."""
        self.active -= 1
        self.bytes_up += sent_up
        self.bytes_down += sent_down
        self.ended[ended] = self.ended.get(ended, 0) + 1
        if ended.startswith(REFUSED_PREFIX):
            reason = ended[len(REFUSED_PREFIX) :]
            self.failed[reason] = self.failed.get(reason, 0) + 1

    def udp_session_opened(self) -> None:
        self.udp_sessions_active += 1

    def udp_session_ended(self, how: str) -> None:
        self.udp_sessions_active -= 1
        self.udp_sessions_ended[how] = self.udp_sessions_ended.get(how, 0) + 1

    def udp_relayed(self, direction: str, datagrams: int, size: int) -> None:
        """Datagrams relayed and their payloads' bytes: up is client to proxy, down is proxy to client."""
        self.udp_datagrams[direction] += datagrams
        self.udp_bytes[direction] += size

    def udp_dropped(self, reason: str, count: int = 1) -> None:
        self.udp_drops[reason] = self.udp_drops.get(reason, 0) + count

    def connection_named(self, source: str) -> None:
        """A connection will ask for a hostname; ``source``: "dns", "sni" or "host"."""
        self.named[source] = self.named.get(source, 0) + 1

    def attempt_failed(self, upstream: str, fault: str) -> None:
        """One attempt at opening a tunnel through ``upstream`` failed; ``fault``: whose (relay.net.faults)."""
        key = (redact_url(upstream), fault)
        self.attempts_failed[key] = self.attempts_failed.get(key, 0) + 1

    def handshake_done(self, upstream: str, seconds: float) -> None:
        label = redact_url(upstream)
        histogram = self.handshakes.get(label)
        if histogram is None:
            histogram = self.handshakes[label] = _Histogram()
        histogram.observe(seconds)

    def set_upstream_healthy(self, upstream: str, healthy: bool) -> None:
        self.upstream_healthy[redact_url(upstream)] = healthy

    def tunnel_restarted(self, tunnel: str, reason: str) -> None:
        key = (redact_url(tunnel), reason)
        self.tunnel_restarts[key] = self.tunnel_restarts.get(key, 0) + 1

    def preconnect(self, outcome: str) -> None:
        """A pre-opened connection ``taken`` (``missed``: none ready) or dropped (``closed`` by the proxy, ``aged``);
        a plain-HTTP keep-alive connection ``kept`` for the next client, or ``reused`` by one."""
        self.preconnected[outcome] = self.preconnected.get(outcome, 0) + 1

    def dns_query(self, qtype: str, outcome: str, count: int = 1) -> None:
        """``count`` queries answered (or dropped): ``qtype`` from message.type_label, ``outcome`` a fixed word."""
        key = (qtype, outcome)
        self.dns_queries[key] = self.dns_queries.get(key, 0) + count

    def dns_upstream_answered(self, seconds: float) -> None:
        self.dns_upstream.observe(seconds)

    def dns_upstream_failed(self, reason: str) -> None:
        self.dns_upstream_failures[reason] = self.dns_upstream_failures.get(reason, 0) + 1

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("relay_info", "gauge", "Relay version and fast-path implementation; always 1.")
        lines.append(_sample("relay_info", {"version": self.version, "fast_path": self.fast_path}, 1))

        family("relay_connections_accepted_total", "counter", "Client connections accepted.")
        lines.append(_sample("relay_connections_accepted_total", {}, self.accepted))

        family("relay_connections_active", "gauge", "Client connections open now.")
        lines.append(_sample("relay_connections_active", {}, self.active))

        family("relay_connections_ended_total", "counter", "Client connections closed, by how they ended.")
        for how, count in sorted(self.ended.items()):
            lines.append(_sample("relay_connections_ended_total", {"how": how}, count))

        family("relay_connections_failed_total", "counter", "Client connections refused, by reason.")
        for reason, count in sorted(self.failed.items()):
            lines.append(_sample("relay_connections_failed_total", {"reason": reason}, count))

        family(
            "relay_connections_named_total",
            "counter",
            "Client connections opened by a hostname, by where it came from (dns, sni, host).",
        )
        for source, count in sorted(self.named.items()):
            lines.append(_sample("relay_connections_named_total", {"source": source}, count))

        family(
            "relay_upstream_attempts_failed_total",
            "counter",
            "Attempts at opening a tunnel that failed, by upstream and whose fault (proxy, target, relay, client).",
        )
        for (upstream, fault), count in sorted(self.attempts_failed.items()):
            lines.append(_sample("relay_upstream_attempts_failed_total", {"upstream": upstream, "fault": fault}, count))

        family("relay_bytes_total", "counter", "Bytes relayed: up is client to upstream, down is upstream to client.")
        lines.append(_sample("relay_bytes_total", {"direction": "up"}, self.bytes_up))
        lines.append(_sample("relay_bytes_total", {"direction": "down"}, self.bytes_down))

        family("relay_upstream_healthy", "gauge", "1 if the upstream passed its last health check, else 0.")
        for upstream, healthy in sorted(self.upstream_healthy.items()):
            lines.append(_sample("relay_upstream_healthy", {"upstream": upstream}, int(healthy)))

        family("relay_handshake_seconds", "histogram", "Time to set up a connection through the upstream.")
        for upstream, histogram in sorted(self.handshakes.items()):
            _histogram_lines(lines, "relay_handshake_seconds", {"upstream": upstream}, histogram)

        family(
            "relay_preconnect_total",
            "counter",
            "Connections to proxies kept for clients: opened ahead (taken, missed, closed by the proxy, aged), "
            "or left by a plain-HTTP client (kept, reused).",
        )
        for outcome, count in sorted(self.preconnected.items()):
            lines.append(_sample("relay_preconnect_total", {"outcome": outcome}, count))

        family("relay_tunnel_restarts_total", "counter", "Tunnel restarts, by tunnel and reason.")
        for (tunnel, reason), count in sorted(self.tunnel_restarts.items()):
            lines.append(_sample("relay_tunnel_restarts_total", {"tunnel": tunnel, "reason": reason}, count))

        family(
            "relay_dns_queries_total",
            "counter",
            "DNS queries, by type and outcome (cache, upstream, stale, servfail, refused, formerr, no-data, dropped).",
        )
        for (qtype, outcome), count in sorted(self.dns_queries.items()):
            lines.append(_sample("relay_dns_queries_total", {"type": qtype, "outcome": outcome}, count))

        family("relay_dns_upstream_failures_total", "counter", "Questions no DNS upstream answered, by reason.")
        for reason, count in sorted(self.dns_upstream_failures.items()):
            lines.append(_sample("relay_dns_upstream_failures_total", {"reason": reason}, count))

        family("relay_dns_upstream_seconds", "histogram", "Time for a DNS upstream to answer a question.")
        _histogram_lines(lines, "relay_dns_upstream_seconds", {}, self.dns_upstream)

        if self.fake_ips is not None:
            family("relay_dns_fake_ips_in_use", "gauge", "Names holding a fake address, by IP version.")
            for version, count in sorted(self.fake_ips.in_use().items()):
                lines.append(_sample("relay_dns_fake_ips_in_use", {"family": f"ipv{version}"}, count))
            family(
                "relay_dns_fake_ips_recycled_total",
                "counter",
                "Fake addresses taken from the name used longest ago, the pool being full.",
            )
            lines.append(_sample("relay_dns_fake_ips_recycled_total", {}, self.fake_ips.recycled()))

        family("relay_udp_sessions_active", "gauge", "UDP sessions (client address and port) open now.")
        lines.append(_sample("relay_udp_sessions_active", {}, self.udp_sessions_active))
        family("relay_udp_sessions_ended_total", "counter", "UDP sessions ended, by how (idle, proxy-closed, ...).")
        for how, count in sorted(self.udp_sessions_ended.items()):
            lines.append(_sample("relay_udp_sessions_ended_total", {"how": how}, count))
        for name, what, values in (
            ("relay_udp_datagrams_total", "UDP datagrams", self.udp_datagrams),
            ("relay_udp_bytes_total", "UDP payload bytes", self.udp_bytes),
        ):
            family(name, "counter", f"{what} relayed: up is client to proxy, down is proxy to client.")
            for direction in ("up", "down"):
                lines.append(_sample(name, {"direction": direction}, values[direction]))
        family("relay_udp_dropped_total", "counter", "UDP datagrams dropped, by reason.")
        for reason, count in sorted(self.udp_drops.items()):
            lines.append(_sample("relay_udp_dropped_total", {"reason": reason}, count))

        conntrack = read_conntrack(self.conntrack_dir)
        if conntrack is not None:
            family("relay_conntrack_entries", "gauge", "Connections the kernel tracks now (nf_conntrack_count).")
            lines.append(_sample("relay_conntrack_entries", {}, conntrack[0]))
            family("relay_conntrack_max", "gauge", "The most it tracks; past it new connections are dropped.")
            lines.append(_sample("relay_conntrack_max", {}, conntrack[1]))

        family(
            "relay_tasks", "gauge", "Trio tasks alive in this process: flat under a steady load, or something leaks."
        )
        lines.append(_sample("relay_tasks", {}, count_tasks()))

        lines.append("")
        return "\n".join(lines)


def _histogram_lines(lines: list[str], name: str, labels: dict[str, str], histogram: _Histogram) -> None:
    cumulative = 0
    for le, count in zip(_BUCKET_LABELS, histogram.counts):
        cumulative += count
        lines.append(_sample(f"{name}_bucket", {**labels, "le": le}, cumulative))
    lines.append(_sample(f"{name}_sum", labels, repr(histogram.total)))
    lines.append(_sample(f"{name}_count", labels, cumulative))


async def serve_metrics(
    metrics: Metrics, host: str, port: int, status=None, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``GET /metrics`` on HOST:PORT (an IP literal) until cancelled; reports the bound (host, port).
    With ``status`` (relay.status.Status), the status page at ``/`` and its JSON under ``/api/`` too."""
    listener = await open_listener(host, port, transparent=False)
    with listener:
        task_status.started(listener.getsockname()[:2])
        scrapes = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)
        handle = functools.partial(_serve_scraper, metrics, status, scrapes)
        async with trio.open_nursery() as nursery:
            if status is not None:
                nursery.start_soon(status.keep_history)
            await accept_loop(
                listener,
                lambda conn, peer: nursery.start_soon(handle, trio.socket.from_stdlib_socket(conn), peer),
                RateLimited(),
            )


async def _serve_scraper(metrics: Metrics, status, scrapes: trio.CapacityLimiter, conn, _peer) -> None:
    try:
        scrapes.acquire_nowait()
    except trio.WouldBlock:
        conn.close()  # full: refuse at once rather than queue, so a stuck crowd cannot pile up
        return
    stream = trio.SocketStream(conn)
    try:
        with trio.move_on_after(CONNECTION_TIMEOUT):
            await _converse(metrics, status, stream)
    except trio.BrokenResourceError:
        pass  # the scraper went away mid-exchange
    finally:
        scrapes.release()
        await trio.aclose_forcefully(stream)


async def _converse(metrics: Metrics, status, stream: trio.SocketStream) -> None:
    # h11 refuses an incomplete head longer than this; with reads capped at MAX_REQUEST_HEAD
    # buffered, that makes any head over MAX_REQUEST_HEAD fail and any other one fit.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD - 1)
    try:
        while request := await _receive_request(conn, stream):
            await _answer(metrics, status, conn, stream, request)
            # Keep the connection only after a bodiless request: a body is not worth reading.
            if conn.our_state is h11.MUST_CLOSE or not isinstance(conn.next_event(), h11.EndOfMessage):
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send(conn, stream, exc.error_status_hint, b"bad request\n")


async def _receive_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, or None when the client hung up between requests."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            room = MAX_REQUEST_HEAD - len(conn.trailing_data[0])  # at least 1, or h11 would have refused
            conn.receive_data(await stream.receive_some(min(RECEIVE_SIZE, room)))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed
            return None


async def _answer(
    metrics: Metrics, status, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request
) -> None:
    if request.method not in (b"GET", b"HEAD"):
        await _send(conn, stream, 405, b"method not allowed\n", extra_headers=[(b"Allow", b"GET, HEAD")])
        return
    head_only = request.method == b"HEAD"
    if request.target.partition(b"?")[0] != b"/metrics":
        answer = await status.respond(request.target) if status is not None else None
        if answer is None:
            await _send(conn, stream, 404, b"not found, try /metrics\n" if status is None else NOT_FOUND)
            return
        code, content_type, body, headers = answer
        await _send(conn, stream, code, body, content_type=content_type, extra_headers=headers, head_only=head_only)
        return
    # A lone surrogate in a label must not fail the whole scrape.
    body = metrics.render().encode("utf-8", "replace")
    await _send(conn, stream, 200, body, content_type=CONTENT_TYPE, head_only=head_only)


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    content_type: bytes = PLAIN_TEXT,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    head_only: bool = False,
) -> None:
    """One whole response; for HEAD, ``head_only`` keeps the body's length but not the body."""
    headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode())]
    headers += extra_headers or []
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
