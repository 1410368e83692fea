"""Sniffing SNI and Host: whole, byte by byte, any split, several TLS records, garbage."""

import socket
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.http_forward import MAX_EMPTY_LINES
from relay.proto.sniff import HTTP, MAX_SNIFF_BYTES, NOT_RECOGNISED, TLS, Sniffed, Sniffer, sniff, valid_hostname


def client_hello(server_hostname: str | None) -> bytes:
    """A real ClientHello record, as Python's TLS stack writes it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message re-cut into several TLS records of the given sizes."""
    payload, out = hello[5:], b""
    for size in sizes:
        if not payload:
            break
        chunk, payload = payload[:size], payload[size:]
        out += hello[:3] + len(chunk).to_bytes(2, "big") + chunk
    if payload:
        out += hello[:3] + len(payload).to_bytes(2, "big") + payload
    return out


HELLO = client_hello("registry-1.docker.example")
REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: Mirror.Example.org:8080\r\nUser-Agent: t\r\n\r\n"


def feed_in_pieces(data: bytes, cuts: list[int]) -> Sniffed:
    sniffer = Sniffer()
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        verdict = sniffer.receive_data(data[start:cut])
        start = cut
        if verdict is not None:
            break
    return sniffer.result if sniffer.result is not None else sniffer.give_up()


def test_sni_from_a_real_client_hello():
    assert sniff(HELLO) == Sniffed(TLS, "registry-1.docker.example")


def test_client_hello_without_sni():
    assert sniff(client_hello(None)) == Sniffed(TLS, None)


def test_host_header():
    assert sniff(REQUEST) == Sniffed(HTTP, "mirror.example.org")


@pytest.mark.parametrize("data", [HELLO, REQUEST])
def test_one_byte_at_a_time_and_trailing_data(data):
    sniffer = Sniffer()
    for index in range(len(data) - 1):
        assert sniffer.receive_data(data[index : index + 1]) is None
    assert sniffer.receive_data(data[-1:] + b"trailing application bytes") == sniff(data)
    assert sniffer.buffered == data + b"trailing application bytes"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([HELLO, REQUEST, REQUEST + b"body", HELLO + b"\x17\x03\x03"]),
    st.lists(st.integers(0, 600), max_size=12),
)
def test_any_split_gives_the_whole_answer(data, cuts):
    assert feed_in_pieces(data, [c for c in cuts if c < len(data)]) == sniff(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=20))
def test_hello_spread_over_several_records(sizes):
    assert sniff(records(HELLO, sizes)) == Sniffed(TLS, "registry-1.docker.example")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_garbage_is_never_an_error_and_never_yields_an_invalid_name(data, cuts):
    verdict = feed_in_pieces(data, [c for c in cuts if c < len(data)])
    assert verdict.protocol in (None, TLS, HTTP)
    assert verdict.hostname is None or valid_hostname(verdict.hostname) == verdict.hostname


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b[0] not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\x16\r\n"))
def test_random_bytes_are_not_recognised(data):
    assert sniff(data) == NOT_RECOGNISED


@pytest.mark.parametrize("empty", [b"\r\n", b"\n", b"\r\n\n\r\n"])
def test_empty_lines_before_a_request_line_are_skipped_as_the_forwarder_skips_them(empty):
    request = b"GET / HTTP/1.1\r\nHost: Mirror.Example\r\n\r\n"
    assert sniff(empty + request) == Sniffed(HTTP, "mirror.example")
    assert [sniff((empty + request)[:size]) for size in range(1, len(empty) + 1)] == [None] * len(empty)
    assert sniff(b"\r\r\n" + request) == NOT_RECOGNISED  # a bare CR is no empty line


def test_empty_lines_before_a_request_are_bounded():
    request = b"GET / HTTP/1.1\r\nHost: mirror.example\r\n\r\n"
    assert sniff(b"\r\n" * MAX_EMPTY_LINES + request).protocol == HTTP
    assert sniff(b"\r\n" * (MAX_EMPTY_LINES + 1) + request) == NOT_RECOGNISED


def test_server_first_protocols_and_truncated_hello_wait_or_give_up():
    assert sniff(b"SSH-2.0-OpenSSH_9.2\r\n") == NOT_RECOGNISED
    assert sniff(HELLO[:100]) is None
    sniffer = Sniffer()
    sniffer.receive_data(HELLO[:100])
    assert sniffer.give_up() == NOT_RECOGNISED


def test_sniffing_is_bounded():
    endless_head = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_SNIFF_BYTES
    assert sniff(endless_head) == NOT_RECOGNISED
    huge_hello = HELLO[:5] + b"\x01\xff\xff\xff" + b"\x00" * MAX_SNIFF_BYTES
    assert sniff(huge_hello) == Sniffed(TLS, None)


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example\rX-Injected: 1",
        b"evil.example\x00.good",
        b"a b.example",
        b"10.1.2.3",
        b"[2001:db8::1]:443",
        b"localhost",
        b"api.localhost",
        b"example.com:80:80",
        b"example.com:http",
        b"-bad-.example",
        b"x" * 64 + b".example",
        b"",
    ],
)
def test_bad_host_headers_give_no_name(host):
    verdict = sniff(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert verdict is not None and verdict.hostname is None


def test_http_10_without_host():
    assert sniff(b"GET / HTTP/1.0\r\n\r\n") == Sniffed(HTTP, None)


def test_sni_with_forbidden_characters_gives_no_name():
    name = b"evil.example\r\nHost: x"
    extension = (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name
    extensions = b"\x00\x00" + len(extension).to_bytes(2, "big") + extension
    body = (
        b"\x03\x03"
        + b"r" * 32
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    assert sniff(b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello) == Sniffed(TLS, None)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("Example.COM.", "example.com"),
        ("a-b.c_d.example", "a-b.c_d.example"),
        ("x" * 63 + ".example", "x" * 63 + ".example"),
        (".".join(["a" * 50] * 5), None),  # 254 bytes
        ("1.2.3.4", None),
        ("例え.jp", None),
        ("a..b", None),
    ],
)
def test_valid_hostname(name, expected):
    assert valid_hostname(name) == expected


@pytest.mark.parametrize(
    "spelling",
    ["2130706433", "0x7f000001", "0X7F000001", "0x7f.0.0.0x1", "0177.0.0.01", "017700000001", "127.1", "127.0.1",
     "0x7f.1", "127.0x0.0.1", "0x7F000001.", "0x", "0", "a.0x1f", "example.123"],
)  # fmt: skip
def test_every_spelling_of_an_ipv4_address_gives_no_name(spelling):
    assert valid_hostname(spelling) is None
    assert sniff(b"GET / HTTP/1.1\r\nHost: " + spelling.encode() + b":9109\r\n\r\n") == Sniffed(HTTP, None)


def test_an_ipv4_mapped_ipv6_literal_in_brackets_gives_no_name():
    for host in (b"[::ffff:127.0.0.1]", b"[::ffff:7f00:1]:22", b"[0:0:0:0:0:ffff:127.0.0.1]:80"):
        assert sniff(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == Sniffed(HTTP, None)


_NUMBERS = st.one_of(
    st.integers(0, 2**32 - 1).map(str),
    st.integers(0, 2**32 - 1).map(lambda n: f"0{n:o}"),
    st.integers(0, 2**32 - 1).map(lambda n: f"0x{n:x}"),
    st.integers(0, 2**32 - 1).map(lambda n: f"0X{n:X}"),
)


@given(st.lists(_NUMBERS, min_size=1, max_size=4), st.booleans())
def test_names_a_resolver_reads_as_an_address_give_no_name(parts, trailing_dot):
    name = ".".join(parts) + ("." if trailing_dot else "")
    assert valid_hostname(name) is None


@given(st.from_regex(r"[a-zA-Z0-9x.]{1,30}", fullmatch=True))
def test_no_name_inet_aton_accepts_is_valid(name):
    try:
        socket.inet_aton(name)
    except OSError:
        return
    assert valid_hostname(name) is None
