"""Fault cases 2, 9 and 10: a scripted proxy answers the relay's real handshake with early
server bytes, malformed, truncated, oversized or slow replies. Only a valid success opens the
tunnel, bytes after the reply reach the client exactly, everything else is a reset (and the
Relays helper checks that nothing leaked and no traceback was logged). Then the same proxy
misbehaving in its answers to plain HTTP forwarded in absolute form."""

import os
import socket
import struct
import time

import pytest

from tests.e2e.clients import connect, expect_reset, receive_exactly
from tests.e2e.fake_proxy import FakeProxy

EARLY = b"server bytes that came with the proxy reply\r\n"
HTTP_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
SOCKS5_OK = b"\x05\x00\x00\x01" + socket.inet_aton("10.9.8.7") + struct.pack("!H", 4321)
PING = b"ping\n"


@pytest.fixture
def fake_proxy(lab):
    proxies = []

    def make(*args, **kwargs):
        proxies.append(FakeProxy(lab, *args, **kwargs))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def through(run_relay, proxy, *extra):
    return run_relay(proxy.url, "--sniff-timeout", "0.1", "--handshake-timeout", "2", *extra)


def assert_tunnel_carries(lab, expected_first: bytes):
    """The client gets ``expected_first`` (sent by the proxy right after its reply), then its own echo."""
    with connect(lab, timeout=5) as sock:
        sock.sendall(PING)
        assert receive_exactly(sock, len(expected_first) + len(PING)) == expected_first + PING
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""


def assert_refused(lab, relay, reason_prefix="refused:"):
    with connect(lab, timeout=5) as sock:
        sock.sendall(PING)
        expect_reset(sock, within=5)
    [line] = relay.connections(at_least=1)
    assert line["end"].startswith(reason_prefix), line


SOCKS5_SUCCESSES = {
    "ipv4": SOCKS5_OK,
    "domain": b"\x05\x00\x00\x03\x0bexample.lab" + struct.pack("!H", 80),
    "ipv6": b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "fd00::1") + struct.pack("!H", 80),
}


@pytest.mark.parametrize(
    "kind,reply",
    [("http", HTTP_OK), *[("socks5", r) for r in SOCKS5_SUCCESSES.values()]],
    ids=["http", *[f"socks5-{atyp}" for atyp in SOCKS5_SUCCESSES]],
)
def test_reply_and_server_bytes_in_one_segment_arrive_exactly(run_relay, lab, fake_proxy, kind, reply):
    proxy = fake_proxy(kind, [reply + EARLY], then="echo")
    through(run_relay, proxy)
    assert_tunnel_carries(lab, EARLY)


def test_http_200_with_content_length_is_a_tunnel_and_its_bytes_are_forwarded(run_relay, lab, fake_proxy):
    # A 2xx answer to CONNECT has no body (RFC 9110 9.3.6): what follows belongs to the tunnel.
    proxy = fake_proxy("http", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + EARLY], then="echo")
    through(run_relay, proxy)
    assert_tunnel_carries(lab, EARLY)


@pytest.mark.parametrize("kind,reply", [("http", HTTP_OK), ("socks5", SOCKS5_OK)])
def test_reply_split_at_every_byte(run_relay, lab, fake_proxy, kind, reply):
    whole = reply + EARLY
    proxy = fake_proxy(kind, [whole[i : i + 1] for i in range(len(whole))], then="echo", pause=0.002)
    through(run_relay, proxy)
    assert_tunnel_carries(lab, EARLY)


MALFORMED = {
    "http-status-2000": ("http", [b"HTTP/1.1 2000 OK\r\n\r\n"]),
    "http-no-blank-line": ("http", [b"HTTP/1.1 200 OK\r\nServer: fake\r\n"]),
    "http-407-with-body": ("http", [b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 5\r\n\r\nhello"]),
    "http-502-with-body": ("http", [b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"]),
    "http-garbage": ("http", [b"\x00\xffnot http at all\r\n\r\n"]),
    "http-empty": ("http", []),
    "socks5-bad-version": ("socks5", [b"\x04\x00\x00\x01\x00\x00\x00\x00\x00\x00"]),
    "socks5-bad-atyp": ("socks5", [b"\x05\x00\x00\x02\x00\x00\x00\x00\x00\x00"]),
    "socks5-truncated": ("socks5", [SOCKS5_OK[:6]]),
    "socks5-empty": ("socks5", []),
    **{f"socks5-error-{code}": ("socks5", [b"\x05" + bytes([code]) + SOCKS5_OK[2:]]) for code in range(1, 10)},
}


@pytest.mark.parametrize("case", MALFORMED)
def test_anything_but_a_valid_success_is_a_reset(run_relay, lab, fake_proxy, case):
    kind, reply = MALFORMED[case]
    proxy = fake_proxy(kind, reply)
    relay = through(run_relay, proxy)
    assert_refused(lab, relay)


def test_oversized_reply_headers_are_a_reset(run_relay, lab, fake_proxy):
    header = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    proxy = fake_proxy("http", [b"HTTP/1.1 200 OK\r\n" + header * 17 + b"\r\n"], then="hold")
    relay = through(run_relay, proxy)
    assert_refused(lab, relay)


@pytest.mark.parametrize("then", ["hold", "close"], ids=["one-byte-per-second", "never-answers"])
def test_slow_proxy_hits_the_handshake_timeout(run_relay, lab, fake_proxy, then):
    reply = [HTTP_OK[i : i + 1] for i in range(len(HTTP_OK))] if then == "hold" else []
    proxy = fake_proxy("http", reply, then="hold", pause=1.0)
    relay = through(run_relay, proxy)
    started = time.monotonic()
    with connect(lab, timeout=5) as sock:
        sock.sendall(PING)
        expect_reset(sock, within=6)
    took = time.monotonic() - started
    assert 1.5 < took < 4, took  # --handshake-timeout 2
    assert relay.connections(at_least=1)[0]["end"] == "refused:handshake-timeout"


# Plain HTTP forwarded in absolute form: the fake proxy answers the forwarded request.

INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def cpu_seconds(pid: int) -> float:
    utime, stime = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def test_endless_interim_responses_are_cut_off(run_relay, lab, fake_proxy, figures):
    proxy = fake_proxy("http", [INTERIM * 1000] * 1000)  # 25 MB of 100 Continue, as fast as it goes
    relay = through(run_relay, proxy)
    leader = lab.process(relay.name).pid
    cpu_before, started = cpu_seconds(leader), time.monotonic()
    with connect(lab, timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: h.example\r\n\r\n")
        seen = b""
        try:
            while chunk := sock.recv(65536):
                seen += chunk
        except ConnectionResetError:
            took = time.monotonic() - started
        else:
            raise AssertionError("the connection ended with a FIN, not a reset")
    # At most 32 passed on; a reset may drop some of those still unread in the client's socket.
    assert 0 < seen.count(b" 100 ") <= 32
    assert relay.connections(at_least=1)[0]["end"] == "proxy-protocol-error"
    figures(
        "endless 100 Continue",
        f"reset after 32 of them, {took * 1000:.0f} ms, {cpu_seconds(leader) - cpu_before:.2f} CPU-s",
    )


def test_a_response_nobody_asked_for_never_answers_the_next_request(run_relay, lab, fake_proxy):
    proxy = fake_proxy("http", [ok(b"asked for") + ok(b"unrequested")], then="hold")
    relay = through(run_relay, proxy)
    with connect(lab, timeout=5) as sock:
        for path in ("/a", "/b"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: h.example\r\n\r\n".encode())
            assert receive_exactly(sock, len(ok(b"asked for"))).endswith(b"\r\n\r\nasked for")
    assert len(proxy.requests) == 2  # each on a connection of its own
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and line["http-requests"] == "2"
