"""Metrics: the exposition text checked by a strict little parser, and the HTTP endpoint over loopback."""

import math
import re
import socket

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay import metrics as metrics_module
from relay.metrics import HANDSHAKE_BUCKETS, MAX_CONCURRENT_SCRAPES, MAX_REQUEST_HEAD, Metrics, serve_metrics
from relay.net.listener import ipv6_available

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|Inf)|NaN")
UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def parse_labels(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Labels from just after ``{`` to just after ``}``, unescaping values."""
    labels: dict[str, str] = {}
    while text[pos] != "}":
        name = LABEL_NAME.match(text, pos)
        assert name, f"bad label name at {text[pos:]!r}"
        pos = name.end()
        assert text[pos : pos + 2] == '="', f'expected =" at {text[pos:]!r}'
        pos += 2
        value = []
        while text[pos] != '"':
            if text[pos] == "\\":
                assert text[pos + 1] in UNESCAPE, f"bad escape in {text!r}"
                value.append(UNESCAPE[text[pos + 1]])
                pos += 2
            else:
                assert text[pos] != "\n"
                value.append(text[pos])
                pos += 1
        assert name.group() not in labels, f"label repeated in {text!r}"
        labels[name.group()] = "".join(value)
        pos += 1
        if text[pos] == ",":
            pos += 1
    return labels, pos + 1


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """Check ``text`` against text format 0.0.4 and return {(sample name, sorted labels): value}."""
    assert text.endswith("\n")
    samples: dict[tuple[str, tuple], float] = {}
    helped: set[str] = set()
    types: dict[str, str] = {}
    current = None  # the family being written: its samples must follow its HELP and TYPE
    histograms: dict[tuple[str, tuple], list[tuple[float, float]]] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# "):
            keyword, name, rest = line[2:].split(" ", 2)
            assert METRIC_NAME.fullmatch(name), line
            if keyword == "HELP":
                assert name not in helped, f"second HELP: {line}"
                helped.add(name)
            else:
                assert keyword == "TYPE" and name not in types, line
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                if rest == "counter":
                    assert name.endswith("_total"), f"counter without _total: {line}"
                types[name] = rest
            current = name
            continue
        name_match = METRIC_NAME.match(line)
        assert name_match, f"bad sample line {line!r}"
        name, pos = name_match.group(), name_match.end()
        labels: dict[str, str] = {}
        if line[pos] == "{":
            labels, pos = parse_labels(line, pos + 1)
        assert line[pos] == " ", f"no space before the value: {line!r}"
        assert VALUE.fullmatch(line[pos + 1 :]), f"bad value (or a timestamp, which we never emit): {line!r}"
        value = float(line[pos + 1 :])
        family = name
        if current is not None and types.get(current) == "histogram" and name.startswith(current):
            family = current
            assert name[len(current) :] in HISTOGRAM_SUFFIXES, line
        assert family == current, f"sample outside its family: {line}"
        assert family in helped and family in types, f"sample before HELP and TYPE: {line}"
        key = (name, tuple(sorted(labels.items())))
        assert key not in samples, f"duplicate sample: {line}"
        samples[key] = value
        if name.endswith("_bucket") and family != name:
            le = labels.pop("le")
            histograms.setdefault((family, tuple(sorted(labels.items()))), []).append((float(le), value))
    for (family, labels), buckets in histograms.items():
        bounds = [bound for bound, _ in buckets]
        counts = [count for _, count in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"bad le order in {family}{labels}"
        assert counts == sorted(counts), f"buckets not cumulative in {family}{labels}"
        assert samples[(family + "_count", labels)] == counts[-1]
        assert (family + "_sum", labels) in samples
    return samples


def sample(text: str, name: str, **labels: str) -> float:
    return parse_exposition(text)[(name, tuple(sorted(labels.items())))]


def new_metrics() -> Metrics:
    return Metrics(version="1.2.3", fast_path="python")


@pytest.mark.parametrize(
    "broken",
    [
        "x_total 1\n",  # no HELP/TYPE
        '# HELP x_total h\n# TYPE x_total counter\nx_total{a="b} 1\n',
        "# HELP x h\n# TYPE x counter\nx 1\n",  # counter without _total
        "# HELP h h\n# TYPE h histogram\n"
        'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
        "# HELP h h\n# TYPE h histogram\n"
        'h_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',  # +Inf != count
        "# HELP g h\n# TYPE g gauge\ng 1",  # no final newline
    ],
)
def test_the_checker_rejects_broken_text(broken):
    with pytest.raises((AssertionError, ValueError, IndexError, KeyError)):
        parse_exposition(broken)


def test_fresh_metrics_render_valid_text():
    text = new_metrics().render()
    samples = parse_exposition(text)
    assert samples[("relay_info", (("fast_path", "python"), ("version", "1.2.3")))] == 1
    assert samples[("relay_connections_accepted_total", ())] == 0
    assert samples[("relay_connections_active", ())] == 0
    assert samples[("relay_bytes_total", (("direction", "up"),))] == 0
    for family in ("relay_handshake_seconds", "relay_upstream_healthy", "relay_tunnel_restarts_total"):
        assert f"# TYPE {family} " in text


def test_connection_counters_move():
    m = new_metrics()
    for _ in range(5):
        m.connection_accepted()
    m.connection_closed("closed", 100, 2000)
    m.connection_closed("client-reset", 1, 2)
    m.connection_closed("refused:no-upstream", 0, 0)
    m.connection_closed("refused:no-upstream", 0, 0)
    text = m.render()
    assert sample(text, "relay_connections_accepted_total") == 5
    assert sample(text, "relay_connections_active") == 1
    assert sample(text, "relay_connections_ended_total", how="closed") == 1
    assert sample(text, "relay_connections_ended_total", how="client-reset") == 1
    assert sample(text, "relay_connections_ended_total", how="refused:no-upstream") == 2
    assert sample(text, "relay_connections_failed_total", reason="no-upstream") == 2
    assert ("relay_connections_failed_total", (("reason", "closed"),)) not in parse_exposition(text)
    assert sample(text, "relay_bytes_total", direction="up") == 101
    assert sample(text, "relay_bytes_total", direction="down") == 2002


def test_failed_attempts_are_counted_by_upstream_and_fault_without_the_password():
    m = new_metrics()
    m.attempt_failed("http://u:secret@10.0.0.1:3128", "proxy")
    m.attempt_failed("http://u:secret@10.0.0.1:3128", "proxy")
    m.attempt_failed("http://u:secret@10.0.0.1:3128", "target")
    text = m.render()
    upstream = "http://u:***@10.0.0.1:3128"
    assert sample(text, "relay_upstream_attempts_failed_total", upstream=upstream, fault="proxy") == 2
    assert sample(text, "relay_upstream_attempts_failed_total", upstream=upstream, fault="target") == 1
    assert "secret" not in text


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=20))
def test_bytes_add_up(transfers):
    m = new_metrics()
    for up, down in transfers:
        m.connection_accepted()
        m.connection_closed("closed", up, down)
    text = m.render()
    assert sample(text, "relay_bytes_total", direction="up") == sum(up for up, _ in transfers)
    assert sample(text, "relay_bytes_total", direction="down") == sum(down for _, down in transfers)


def test_handshake_histogram_buckets():
    m = new_metrics()
    for seconds in (0.001, 0.005, 0.02, 0.3, 3, 60):
        m.handshake_done("http://proxy:3128", seconds)
    m.handshake_done("direct", 0.2)
    text = m.render()
    up = "http://proxy:3128"
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="0.005") == 2  # le is inclusive
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="0.025") == 3
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="0.5") == 4
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="5") == 5
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="10") == 5
    assert sample(text, "relay_handshake_seconds_bucket", upstream=up, le="+Inf") == 6
    assert sample(text, "relay_handshake_seconds_count", upstream=up) == 6
    assert sample(text, "relay_handshake_seconds_sum", upstream=up) == pytest.approx(63.326)
    assert sample(text, "relay_handshake_seconds_count", upstream="direct") == 1
    les = {labels for name, labels in parse_exposition(text) if name == "relay_handshake_seconds_bucket"}
    assert len(les) == 2 * (len(HANDSHAKE_BUCKETS) + 1)


@given(st.lists(st.floats(0, 100), max_size=30))
def test_histogram_stays_valid(observations):
    m = new_metrics()
    for seconds in observations:
        m.handshake_done("http://p:1", seconds)
    parse_exposition(m.render())


def test_upstream_health_and_tunnel_restarts():
    m = new_metrics()
    m.set_upstream_healthy("http://a:1", True)
    m.set_upstream_healthy("http://b:1", True)
    m.set_upstream_healthy("http://b:1", False)
    m.tunnel_restarted("ssh-1", "exited")
    m.tunnel_restarted("ssh-1", "exited")
    m.tunnel_restarted("ssh-1", "stalled")
    text = m.render()
    assert sample(text, "relay_upstream_healthy", upstream="http://a:1") == 1
    assert sample(text, "relay_upstream_healthy", upstream="http://b:1") == 0
    assert sample(text, "relay_tunnel_restarts_total", tunnel="ssh-1", reason="exited") == 2
    assert sample(text, "relay_tunnel_restarts_total", tunnel="ssh-1", reason="stalled") == 1


def test_preconnect_outcomes():
    m = new_metrics()
    for outcome in ("taken", "taken", "missed", "closed", "aged"):
        m.preconnect(outcome)
    text = m.render()
    assert sample(text, "relay_preconnect_total", outcome="taken") == 2
    assert [sample(text, "relay_preconnect_total", outcome=o) for o in ("missed", "closed", "aged")] == [1, 1, 1]


def test_passwords_never_rendered():
    """Callers must pass redacted URLs; if one slips through, the metrics redact it again."""
    m = new_metrics()
    m.set_upstream_healthy("http://user:secret@proxy:3128", True)
    m.handshake_done("socks5://user:secret@proxy:1080", 0.1)
    m.tunnel_restarted("http://user:secret@proxy:3128", "exited")
    text = m.render()
    assert "secret" not in text
    assert sample(text, "relay_upstream_healthy", upstream="http://user:***@proxy:3128") == 1
    assert sample(text, "relay_handshake_seconds_count", upstream="socks5://user:***@proxy:1080") == 1


@given(st.text())
def test_label_values_round_trip(value):
    m = Metrics(version=value, fast_path="python")
    m.connection_accepted()
    m.connection_closed(value, 0, 0)
    m.connection_closed("refused:" + value, 0, 0)
    samples = parse_exposition(m.render())
    assert samples[("relay_connections_ended_total", (("how", value),))] == 1
    assert samples[("relay_connections_failed_total", (("reason", value),))] == 1
    assert samples[("relay_info", (("fast_path", "python"), ("version", value)))] == 1


# --- the HTTP endpoint -------------------------------------------------------

CLIENT_TIMEOUT = 5


@pytest.fixture
async def served(nursery):
    m = new_metrics()
    address = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    return m, address


async def exchange(stream, conn: h11.Connection, method: bytes, target: bytes, body: bytes = b""):
    """One request on ``conn``; returns (response, body)."""
    headers = [(b"Host", b"metrics"), (b"Content-Length", str(len(body)).encode())]
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    data += conn.send(h11.Data(data=body)) if body else b""
    await stream.send_all(data + conn.send(h11.EndOfMessage()))
    response, received = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            received += event.data
        elif isinstance(event, h11.EndOfMessage):
            return response, received
        else:
            raise AssertionError(f"unexpected {event!r}")


async def fetch(address, method=b"GET", target=b"/metrics", body=b""):
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            return await exchange(stream, h11.Connection(h11.CLIENT), method, target, body)


async def read_until_closed(stream) -> bytes:
    """All the server sends before closing; a reset counts as a close."""
    received = b""
    try:
        while data := await stream.receive_some(65536):
            received += data
    except trio.BrokenResourceError:
        pass
    return received


async def test_serves_metrics(served):
    m, address = served
    assert address[0] == "127.0.0.1" and address[1] > 0
    m.connection_accepted()
    response, body = await fetch(address)
    assert response.status_code == 200
    assert dict(response.headers)[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert text == m.render()
    assert sample(text, "relay_connections_accepted_total") == 1


async def test_unencodable_label_does_not_break_the_scrape(served):
    m, address = served
    m.connection_accepted()
    m.connection_closed("lone \ud800 surrogate", 0, 0)
    response, body = await fetch(address)
    assert response.status_code == 200
    assert sample(body.decode(), "relay_connections_ended_total", how="lone ? surrogate") == 1


async def test_head_has_no_body(served):
    m, address = served
    response, body = await fetch(address, method=b"HEAD")
    assert response.status_code == 200 and body == b""
    assert int(dict(response.headers)[b"content-length"]) == len(m.render().encode())


async def test_query_string_is_ignored(served):
    _, address = served
    response, _ = await fetch(address, target=b"/metrics?format=text")
    assert response.status_code == 200


async def test_other_paths_are_404(served):
    _, address = served
    for target in (b"/other", b"/", b"/metrics/x", b"/metricsx"):
        response, _ = await fetch(address, target=target)
        assert response.status_code == 404


async def test_other_methods_are_405(served):
    _, address = served
    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
        response, _ = await fetch(address, method=method, body=b"x=1" if method == b"POST" else b"")
        assert response.status_code == 405
        assert dict(response.headers)[b"allow"] == b"GET, HEAD"


async def test_keep_alive_100_scrapes(served):
    m, address = served
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for count in range(1, 101):
                m.connection_accepted()
                response, body = await exchange(stream, conn, b"GET", b"/metrics")
                assert response.status_code == 200
                assert sample(body.decode(), "relay_connections_accepted_total") == count
                conn.start_next_cycle()


async def test_100_scrapes_on_new_connections(served):
    m, address = served
    for count in range(1, 101):
        m.handshake_done("http://p:1", count / 1000)
        response, body = await fetch(address)
        assert response.status_code == 200
        assert sample(body.decode(), "relay_handshake_seconds_count", upstream="http://p:1") == count


GARBAGE = {
    "binary": b"\x00\xff\xfe garbage \r\n\r\n",
    "bad-version": b"GET /metrics FTP/1.0\r\n\r\n",
    "bad-length": b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    "head-too-long": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10000 + b"\r\n\r\n",
    "no-colon": b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    "unknown-encoding": b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "truncated": b"GET /metr",
    "blank-lines": b"\r\n" * 5000,
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_gets_an_error_or_close(served, garbage):
    _, address = served
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            try:
                await stream.send_all(garbage)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the server may hang up before reading it all
            answer = await read_until_closed(stream)
    assert answer == b"" or re.match(rb"HTTP/1\.1 (400|431|501) ", answer), answer[:100]
    response, _ = await fetch(address)  # and the server is still up
    assert response.status_code == 200


@pytest.mark.parametrize(("size", "status"), [(MAX_REQUEST_HEAD, 200), (MAX_REQUEST_HEAD + 1, 431)])
async def test_request_head_limit(served, size, status):
    _, address = served
    start, end = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    head = start + b"a" * (size - len(start) - len(end)) + end
    assert len(head) == size
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(head)
            answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 %d " % status)


async def test_idle_connection_is_closed_after_the_timeout(served, monkeypatch):
    monkeypatch.setattr(metrics_module, "CONNECTION_TIMEOUT", 0.5)
    _, address = served
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            assert await read_until_closed(stream) == b""


async def test_too_many_idle_connections_do_not_block_scrapes(served, monkeypatch):
    monkeypatch.setattr(metrics_module, "CONNECTION_TIMEOUT", 2.0)
    _, address = served
    crowd = MAX_CONCURRENT_SCRAPES + 6
    closed_early = 0

    async def idle(stream):
        nonlocal closed_early
        with trio.move_on_after(1.0):
            await read_until_closed(stream)
            closed_early += 1

    streams = [await trio.open_tcp_stream(*address) for _ in range(crowd)]
    try:
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(idle, stream)
        assert closed_early == crowd - MAX_CONCURRENT_SCRAPES  # the extra ones, at once
        with trio.fail_after(CLIENT_TIMEOUT):  # the idle ones time out and free their slots
            while True:
                try:
                    response, _ = await fetch(address)
                    break
                except (trio.BrokenResourceError, h11.RemoteProtocolError):
                    await trio.sleep(0.1)  # turned away while still full
        assert response.status_code == 200
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_serves_on_ipv6(nursery):
    m = new_metrics()
    host, port = await nursery.start(serve_metrics, m, "::1", 0)
    assert host == "::1"
    with trio.fail_after(CLIENT_TIMEOUT):
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        await sock.connect(("::1", port))
        stream = trio.SocketStream(sock)
        async with stream:
            response, _ = await exchange(stream, h11.Connection(h11.CLIENT), b"GET", b"/metrics")
    assert response.status_code == 200


async def test_task_gauge_counts_live_tasks():
    metrics = new_metrics()
    before = sample(metrics.render(), "relay_tasks")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert sample(metrics.render(), "relay_tasks") == before + 3
        nursery.cancel_scope.cancel()
    assert sample(metrics.render(), "relay_tasks") == before


def test_conntrack_use_is_exported_where_the_kernel_tracks(tmp_path):
    metrics = Metrics(version="1", fast_path="x")
    metrics.conntrack_dir = str(tmp_path)
    assert "relay_conntrack" not in metrics.render()  # not loaded: nothing, rather than a made-up 0
    (tmp_path / "nf_conntrack_count").write_text("1234\n")
    (tmp_path / "nf_conntrack_max").write_text("262144\n")
    samples = parse_exposition(metrics.render())
    assert samples[("relay_conntrack_entries", ())] == 1234
    assert samples[("relay_conntrack_max", ())] == 262144
