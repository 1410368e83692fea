"""Generated handshakes, checked end to end.

For every protocol, against replies built from the specs (RFC 9110, SOCKS4/4a,
RFC 1928, RFC 1929) rather than taken from a list:

- any valid success reply, followed by any tunnel bytes and cut into any
  chunks, establishes the tunnel and hands back exactly those tunnel bytes;
- anything else (random bytes, a truncated success then EOF, a refusal, a
  wrong version, an oversized head...) ends in ``RemoteProtocolError`` (or its
  subclass ``ProxyRefused``), never in success nor in a foreign exception,
  and the machine decides before it has buffered more than the largest reply
  it can accept;
- any target a protocol can carry gives a request that parses back to that
  target, and any other target raises ``LocalProtocolError`` up front.
"""

import base64
import ipaddress
import string
import struct
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from relay.proto.http_connect import MAX_REPLY_HEAD_SIZE, HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client
from tests.proto.support import split_at

SETTINGS = settings(max_examples=150, deadline=None)

# The longest replies the SOCKS clients must accept before deciding:
# method choice (2), auth status (2), then VER REP RSV ATYP LEN NAME(255) PORT.
SOCKS4_REPLY_SIZE = 8
SOCKS5_LONGEST_REPLY = 2 + 2 + (4 + 1 + 255 + 2)


# --- driving a machine -------------------------------------------------------------


@dataclass
class Run:
    """What happened while feeding a machine, chunk by chunk."""

    sent: bytearray = field(default_factory=bytearray)  # everything data_to_send() gave, in order
    error: ProtocolError | None = None
    fed: int = 0  # bytes fed before the machine established or failed (all of them if neither)
    # After each chunk: (bytes fed so far, bytes sent so far, established)
    steps: list[tuple[int, int, bool]] = field(default_factory=list)


def drive(machine, chunks: list[bytes], eof: bool = False) -> Run:
    """Feed ``chunks`` (then EOF), collecting what the machine sends after each one.

    Only ``ProtocolError`` is caught: any other exception fails the test.
    """
    run = Run()
    run.sent += machine.data_to_send()
    for chunk in [*chunks, *([b""] if eof else [])]:
        was_established = machine.established
        try:
            machine.receive_data(chunk)
            run.sent += machine.data_to_send()
        except ProtocolError as exc:
            run.error = exc
            run.fed += len(chunk)
            break
        if not was_established:
            run.fed += len(chunk)
        run.steps.append((run.fed, len(run.sent), machine.established))
    return run


def assert_failed_for_good(machine, run: Run) -> None:
    """A peer fault, and a dead machine that keeps saying so."""
    assert isinstance(run.error, RemoteProtocolError), run.error
    assert not machine.established
    assert machine.trailing_data == b""
    for call in (lambda: machine.receive_data(b"more"), lambda: machine.receive_data(b""), machine.data_to_send):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is run.error


@st.composite
def chunked(draw, message: bytes) -> list[bytes]:
    """``message`` cut at up to 30 random places."""
    cuts = draw(st.lists(st.integers(0, len(message)), max_size=min(len(message), 30)))
    return split_at(message, cuts)


tunnel_bytes = st.binary(max_size=64)


# --- targets ------------------------------------------------------------------------

ports = st.integers(1, 65535)
bad_ports = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=65536),
    st.sampled_from([True, False, None, 443.0, "443", b"443"]),
)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
# Letters, digits, '-', '.', '_' are what real names use; SOCKS carries any ASCII but NUL.
dns_names = st.text(string.ascii_letters + string.digits + "-._", min_size=1, max_size=255)
socks_names = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=255)
# Printable ASCII without whitespace and without what changes the meaning of host:port.
http_names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#@[]:"),
    min_size=1,
    max_size=255,
)
# Anything at all, surrogates included: names the checks must sort into good and bad.
any_hosts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=300),
    st.text(string.printable, max_size=20),
    st.builds(lambda ip, zone: f"{ip}%{zone}", ipv6_hosts, st.text(string.ascii_letters, min_size=1, max_size=5)),
    st.sampled_from(["", "x" * 256, "a b", "a\x00b", "é.example", "[::1]", "host:80", "user@host"]),
    dns_names,
)


def ip_literal(host: str):
    """The address when ``host`` is an IP literal, else None (the specs' rule, restated)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_scoped(host: str) -> bool:
    address = ip_literal(host)
    return isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None


def ascii_length_ok(host: str) -> bool:
    return host.isascii() and 1 <= len(host) <= 255


def http_can_carry(host: str) -> bool:
    if is_scoped(host):
        return False
    if ip_literal(host) is not None:
        return True
    return ascii_length_ok(host) and all(0x21 <= ord(c) <= 0x7E for c in host) and not any(c in "/?#@[]:" for c in host)


def socks_name_ok(host: str) -> bool:
    return ascii_length_ok(host) and "\0" not in host


def socks5_can_carry(host: str) -> bool:
    if is_scoped(host):
        return False
    return ip_literal(host) is not None or socks_name_ok(host)


def socks4_can_carry(host: str, use_4a: bool) -> bool:
    address = ip_literal(host)
    if is_scoped(host) or isinstance(address, ipaddress.IPv6Address):
        return False
    if address is not None:
        # 0.0.0.x (x != 0) is the SOCKS4a "hostname follows" marker.
        return not (address.packed[:3] == b"\0\0\0" and address.packed[3] != 0)
    return use_4a and socks_name_ok(host)


def authority(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")


# --- parsing what the client sends (independently of the client) --------------------


def parse_http_request(data: bytes):
    """(target, headers) of the one CONNECT request in ``data``, parsed by h11 as a server."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request), request
    assert request.method == b"CONNECT"
    assert request.http_version == b"1.1"
    assert isinstance(server.next_event(), h11.EndOfMessage)
    # A 2xx to CONNECT is a protocol switch: nothing may follow the head.
    assert server.next_event() is h11.PAUSED
    assert data.endswith(b"\r\n\r\n")
    return request.target, dict(request.headers)


def parse_socks_address(atyp: int, data: bytes) -> tuple[object, int, int]:
    """(host, port, size) of ATYP ADDR PORT at the start of ``data``."""
    if atyp == 1:
        host, size = ipaddress.IPv4Address(data[:4]), 4
    elif atyp == 4:
        host, size = ipaddress.IPv6Address(data[:16]), 16
    else:
        assert atyp == 3, atyp
        host, size = data[1 : 1 + data[0]], 1 + data[0]
    assert len(data) >= size + 2
    (port,) = struct.unpack_from("!H", data, size)
    return host, port, size + 2


def assert_socks5_connect(request: bytes, host: str, port: int) -> None:
    assert request[:3] == b"\x05\x01\x00"
    got_host, got_port, size = parse_socks_address(request[3], request[4:])
    assert 4 + size == len(request)
    address = ip_literal(host)
    if address is not None:
        assert got_host == address
    else:
        assert request[3] == 3
        assert got_host == host.encode("ascii")
    assert got_port == port


def assert_socks4_connect(request: bytes, host: str, port: int, user_id: str) -> None:
    version, command, got_port, raw_address = struct.unpack_from("!BBH4s", request)
    assert (version, command, got_port) == (4, 1, port)
    user, _, rest = request[8:].partition(b"\0")
    assert user == user_id.encode("utf-8")
    # Read as a SOCKS4a proxy does: 0.0.0.x with x != 0 says a name follows the user id.
    if raw_address[:3] == b"\0\0\0" and raw_address[3] != 0:
        assert rest == host.encode("ascii") + b"\0"
    else:
        assert raw_address == ip_literal(host).packed
        assert rest == b""


# --- requests ---------------------------------------------------------------------------

credentials = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {"username": st.text(max_size=40).filter(lambda u: ":" not in u), "password": st.text(max_size=40)}
    ),
)


@SETTINGS
@given(host=st.one_of(dns_names, http_names, ipv4_hosts, ipv6_hosts), port=ports, creds=credentials)
def test_http_request_for_any_valid_target_parses_back(host, port, creds):
    target, headers = parse_http_request(HttpConnectClient(host, port, **creds).data_to_send())
    assert target == authority(host, port)
    assert headers.pop(b"host") == target
    if creds:
        userpass = f"{creds['username']}:{creds['password']}".encode()
        assert base64.b64decode(headers.pop(b"proxy-authorization").removeprefix(b"Basic ")) == userpass
    assert headers == {}


@SETTINGS
@given(host=st.one_of(dns_names, socks_names, ipv4_hosts, ipv6_hosts), port=ports, creds=credentials)
def test_socks5_request_for_any_valid_target_parses_back(host, port, creds):
    machine = Socks5Client(host, port, **creds)
    methods = b"\x00\x02" if creds else b"\x00"
    assert machine.data_to_send() == b"\x05" + bytes([len(methods)]) + methods
    if creds:
        machine.receive_data(b"\x05\x02")
        user, password = creds["username"].encode(), creds["password"].encode()
        assert machine.data_to_send() == b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
        machine.receive_data(b"\x01\x00")
    else:
        machine.receive_data(b"\x05\x00")
    assert_socks5_connect(machine.data_to_send(), host, port)


@SETTINGS
@given(
    target=st.one_of(
        st.tuples(ipv4_hosts.filter(lambda h: socks4_can_carry(h, False)), st.booleans()),
        st.tuples(st.one_of(dns_names, socks_names).filter(lambda h: ip_literal(h) is None), st.just(True)),
    ),
    port=ports,
    user_id=st.text(max_size=20).filter(lambda u: "\0" not in u),
)
def test_socks4_request_for_any_valid_target_parses_back(target, port, user_id):
    host, use_4a = target
    machine = Socks4Client(host, port, user_id=user_id, use_4a=use_4a)
    assert_socks4_connect(machine.data_to_send(), host, port, user_id)


PROTOCOLS = {
    "http": (lambda host, port, use_4a: HttpConnectClient(host, port), lambda host, use_4a: http_can_carry(host)),
    "socks5": (lambda host, port, use_4a: Socks5Client(host, port), lambda host, use_4a: socks5_can_carry(host)),
    "socks4": (lambda host, port, use_4a: Socks4Client(host, port, use_4a=use_4a), socks4_can_carry),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@SETTINGS
@given(host=any_hosts, port=st.one_of(ports, bad_ports), use_4a=st.booleans())
def test_any_target_is_sendable_or_our_fault(protocol, host, port, use_4a):
    make, can_carry = PROTOCOLS[protocol]
    port_ok = type(port) is int and 1 <= port <= 65535
    try:
        machine = make(host, port, use_4a)
    except LocalProtocolError:
        assert not (port_ok and can_carry(host, use_4a))
        return
    assert port_ok and can_carry(host, use_4a)
    if protocol == "http":
        assert parse_http_request(machine.data_to_send())[0] == authority(host, port)
    elif protocol == "socks4":
        assert_socks4_connect(machine.data_to_send(), host, port, "")
    else:
        machine.data_to_send()
        machine.receive_data(b"\x05\x00")
        assert_socks5_connect(machine.data_to_send(), host, port)


@SETTINGS
@given(
    creds=st.one_of(
        st.fixed_dictionaries({"username": st.text(max_size=10)}),
        st.fixed_dictionaries({"password": st.text(max_size=10)}),
        st.fixed_dictionaries({"username": st.text(max_size=300), "password": st.text(max_size=300)}),
    ),
    protocol=st.sampled_from(["http", "socks5"]),
)
def test_credentials_are_sendable_or_our_fault(creds, protocol):
    if protocol == "http":
        ok = len(creds) == 2 and ":" not in creds["username"]
        make = HttpConnectClient
    else:
        ok = len(creds) == 2 and all(len(value.encode()) <= 255 for value in creds.values())
        make = Socks5Client
    try:
        make("example.com", 443, **creds)
    except LocalProtocolError:
        assert not ok
    else:
        assert ok


# --- valid success replies -------------------------------------------------------------

TCHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
field_names = st.text(TCHARS, min_size=1, max_size=20).filter(
    lambda name: name.lower() not in ("content-length", "transfer-encoding")
)
# Visible ASCII and obs-text, with single spaces or tabs inside (never at the ends).
field_words = st.binary(min_size=1, max_size=12).map(
    lambda raw: bytes(b if 0x21 <= b <= 0x7E or b >= 0x80 else 0x21 + b % 0x5E for b in raw)
)
field_values = st.lists(field_words, max_size=4).flatmap(
    lambda words: st.sampled_from([b" ", b"\t"]).map(lambda sep: sep.join(words))
)
header_lines = st.lists(
    st.tuples(field_names, field_values).map(lambda nv: nv[0].encode() + b": " + nv[1] + b"\r\n"),
    max_size=8,
).map(b"".join)
reason_phrases = st.binary(max_size=30).map(
    lambda raw: bytes(b if b in (0x09, 0x20) or 0x21 <= b <= 0x7E or b >= 0x80 else 0x20 for b in raw)
)
http_versions = st.sampled_from([b"1.0", b"1.1"])


def status_line(version: bytes, status: int, reason: bytes) -> bytes:
    return b"HTTP/" + version + b" " + str(status).encode() + (b" " + reason if reason else b"") + b"\r\n"


informational_heads = st.builds(
    lambda version, status, reason, headers: status_line(version, status, reason) + headers + b"\r\n",
    http_versions,
    st.sampled_from([100, 102, 103, 150, 199]),
    reason_phrases,
    header_lines,
)
# What a 2xx may say about a body it does not have: the tunnel follows the head anyway.
body_framing = st.sampled_from(
    [b"", b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]
)
http_success = st.builds(
    lambda infos, version, status, reason, headers, framing: (
        b"".join(infos) + status_line(version, status, reason) + headers + framing + b"\r\n"
    ),
    st.lists(informational_heads, max_size=3),
    http_versions,
    st.integers(200, 299),
    reason_phrases,
    header_lines,
    body_framing,
)


@dataclass(frozen=True)
class Success:
    """A client, and everything a proxy answers it up to and including success."""

    name: str
    make: object
    reply: bytes
    # What the client must have sent in all once ``reply`` is in, and after
    # how many reply bytes each later message may go out (SOCKS5 never pipelines).
    requests: tuple[tuple[int, bytes], ...]
    bound: tuple[str, int] | None = None


def socks5_address(atyp: int, raw: bytes) -> bytes:
    return bytes([atyp]) + (bytes([len(raw)]) + raw if atyp == 3 else raw)


def bound_host(atyp: int, raw: bytes) -> str:
    return raw.decode("ascii", "backslashreplace") if atyp == 3 else str(ipaddress.ip_address(raw))


socks5_bound = st.one_of(
    st.tuples(st.just(1), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(3), st.binary(max_size=255)),
    st.tuples(st.just(4), st.binary(min_size=16, max_size=16)),
)


@st.composite
def successes(draw) -> Success:
    kind = draw(
        st.sampled_from(["http", "http-auth", "socks4", "socks4a", "socks5", "socks5-auth", "socks5-auth-declined"])
    )
    if kind.startswith("http"):
        creds = {"username": "alice", "password": "pw"} if kind == "http-auth" else {}
        request = HttpConnectClient("example.com", 443, **creds).data_to_send()
        return Success(
            kind, lambda: HttpConnectClient("example.com", 443, **creds), draw(http_success), ((0, request),)
        )
    if kind.startswith("socks4"):
        host = "example.com" if kind == "socks4a" else "192.0.2.7"
        reply = bytes([draw(st.sampled_from([0, 4])), 90]) + draw(st.binary(min_size=6, max_size=6))
        make = lambda: Socks4Client(host, 443, use_4a=True)  # noqa: E731
        return Success(kind, make, reply, ((0, make().data_to_send()),))
    atyp, raw = draw(socks5_bound)
    bound_port = draw(st.integers(0, 65535))
    connect_reply = bytes([5, 0, draw(st.integers(0, 255))]) + socks5_address(atyp, raw) + struct.pack("!H", bound_port)
    connect = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    if kind == "socks5":
        return Success(
            kind,
            lambda: Socks5Client("example.com", 443),
            b"\x05\x00" + connect_reply,
            ((0, b"\x05\x01\x00"), (2, connect)),
            (bound_host(atyp, raw), bound_port),
        )
    make = lambda: Socks5Client("example.com", 443, username="alice", password="pw")  # noqa: E731
    if kind == "socks5-auth-declined":
        return Success(
            kind,
            make,
            b"\x05\x00" + connect_reply,
            ((0, b"\x05\x02\x00\x02"), (2, connect)),
            (bound_host(atyp, raw), bound_port),
        )
    auth_reply = bytes([draw(st.sampled_from([1, 5])), 0])
    return Success(
        kind,
        make,
        b"\x05\x02" + auth_reply + connect_reply,
        ((0, b"\x05\x02\x00\x02"), (2, b"\x01\x05alice\x02pw"), (4, connect)),
        (bound_host(atyp, raw), bound_port),
    )


@settings(max_examples=300, deadline=None)
@given(success=successes(), tunnel=tunnel_bytes, eof=st.booleans(), data=st.data())
def test_any_success_hands_back_exactly_the_tunnel_bytes(success, tunnel, eof, data):
    machine = success.make()
    chunks = data.draw(chunked(success.reply + tunnel))
    run = drive(machine, chunks, eof=eof)
    assert run.error is None
    assert machine.established
    assert machine.trailing_data == tunnel
    for fed, _, established in run.steps:
        # Established by the very chunk that completes the reply, not before, not after.
        assert established == (fed >= len(success.reply))
    assert bytes(run.sent) == b"".join(message for _, message in success.requests)
    # Each message goes out only once the reply it answers is whole.
    for fed, sent_size, _ in run.steps:
        due = sum(len(message) for after, message in success.requests if after <= min(fed, len(success.reply)))
        assert sent_size == due
    if success.bound is not None:
        assert machine.bound_address == success.bound


# --- everything else fails, as the peer's fault --------------------------------------


@settings(max_examples=200, deadline=None)
@given(success=successes(), data=st.data())
def test_truncated_success_then_eof_is_a_peer_fault(success, data):
    size = data.draw(st.integers(0, len(success.reply) - 1))
    machine = success.make()
    run = drive(machine, data.draw(chunked(success.reply[:size])), eof=True)
    assert_failed_for_good(machine, run)
    assert "closed" in str(run.error)


def failing_http(head: bytes) -> tuple:
    return (lambda: HttpConnectClient("example.com", 443), head)


@st.composite
def failures(draw) -> tuple:
    """(make the client, bytes after which it must have failed; anything may follow them)."""
    kind = draw(
        st.sampled_from(
            [
                "http-status",
                "http-bad-status-line",
                "http-oversized",
                "socks4-version",
                "socks4-code",
                "socks5-method-version",
                "socks5-method",
                "socks5-auth-version",
                "socks5-auth-status",
                "socks5-reply-version",
                "socks5-reply-code",
                "socks5-atyp",
            ]
        )
    )
    if kind == "http-status":
        infos = b"".join(draw(st.lists(informational_heads, max_size=2)))
        status = draw(st.one_of(st.integers(300, 999), st.sampled_from([101])))
        head = status_line(draw(http_versions), status, draw(reason_phrases)) + draw(header_lines) + b"\r\n"
        return failing_http(infos + head)
    if kind == "http-bad-status-line":
        line = draw(
            st.sampled_from(
                [
                    b"HTTP/2 200 OK",
                    b"HTTP/1.1 2000 OK",
                    b"HTTP/1.1 20 OK",
                    b"HTTP/1.1 OK",
                    b"http/1.1 200 OK",
                    b"HTTP/1.1  200 OK",
                    b"SSH-2.0-OpenSSH",
                    b"\x05\x00",
                ]
            )
        )
        return failing_http(line + b"\r\n" + draw(header_lines) + b"\r\n")
    if kind == "http-oversized":
        # A well-formed head, one byte or more over the limit.
        start = status_line(b"1.1", draw(st.integers(200, 299)), b"OK")
        excess = draw(st.integers(1, 2000))
        pad_size = MAX_REPLY_HEAD_SIZE + excess - len(start) - len(b"X-Pad: \r\n\r\n")
        return failing_http(start + b"X-Pad: " + b"p" * pad_size + b"\r\n\r\n")
    if kind.startswith("socks4"):
        if kind == "socks4-version":
            head = bytes([draw(st.integers(0, 255).filter(lambda v: v not in (0, 4))), draw(st.integers(0, 255))])
        else:
            head = bytes([draw(st.sampled_from([0, 4])), draw(st.integers(0, 255).filter(lambda c: c != 90))])
        return (lambda: Socks4Client("192.0.2.7", 443), head)
    make = lambda: Socks5Client("example.com", 443, username="alice", password="pw")  # noqa: E731
    not_5 = st.integers(0, 255).filter(lambda v: v != 5)
    if kind == "socks5-method-version":
        return (make, bytes([draw(not_5), draw(st.integers(0, 255))]))
    if kind == "socks5-method":
        return (make, bytes([5, draw(st.integers(0, 255).filter(lambda m: m not in (0, 2)))]))
    if kind == "socks5-auth-version":
        return (
            make,
            b"\x05\x02"
            + bytes([draw(st.integers(0, 255).filter(lambda v: v not in (1, 5))), draw(st.integers(0, 255))]),
        )
    if kind == "socks5-auth-status":
        return (make, b"\x05\x02" + bytes([draw(st.sampled_from([1, 5])), draw(st.integers(1, 255))]))
    method = draw(st.sampled_from([b"\x05\x00", b"\x05\x02\x01\x00"]))
    if kind == "socks5-reply-version":
        return (make, method + bytes([draw(not_5), draw(st.integers(0, 255))]))
    if kind == "socks5-reply-code":
        return (make, method + bytes([5, draw(st.integers(1, 255))]))
    return (
        make,
        method
        + bytes([5, 0, draw(st.integers(0, 255)), draw(st.integers(0, 255).filter(lambda a: a not in (1, 3, 4)))]),
    )


@settings(max_examples=300, deadline=None)
@given(failure=failures(), rest=st.binary(max_size=64), eof=st.booleans(), data=st.data())
def test_invalid_replies_are_peer_faults(failure, rest, eof, data):
    make, head = failure
    machine = make()
    run = drive(machine, data.draw(chunked(head + rest)), eof=eof)
    assert_failed_for_good(machine, run)
    # It failed on the chunk that completed ``head`` at the latest: it never waits for more.
    for fed, _, _ in run.steps:
        assert fed < len(head)


@settings(max_examples=200, deadline=None)
@given(success=successes(), garbage=st.binary(max_size=300), eof=st.booleans(), data=st.data())
def test_random_bytes_succeed_only_as_a_valid_reply_would(success, garbage, eof, data):
    """Random bytes after a random valid prefix: a peer fault, or a success the specs allow."""
    prefix = success.reply[: data.draw(st.integers(0, len(success.reply)))]
    machine = success.make()
    run = drive(machine, data.draw(chunked(prefix + garbage)), eof=eof)
    if run.error is not None:
        assert_failed_for_good(machine, run)
        return
    if not machine.established:
        assert not eof
        return
    # Feeding the same bytes at once to a new machine agrees, and the tunnel
    # starts exactly where the reply the machine accepted ends.
    again = success.make()
    again.data_to_send()
    again.receive_data(prefix + garbage)
    assert again.established and again.trailing_data == machine.trailing_data
    assert (prefix + garbage).endswith(machine.trailing_data)


# --- decisions come within a bounded amount of input ---------------------------------


@st.composite
def endless_heads(draw) -> tuple[bytes, bytes]:
    """Valid 1xx heads, then a well-formed head that never ends, longer than the limit."""
    infos = b"".join(draw(st.lists(informational_heads, max_size=2)))
    head = status_line(draw(http_versions), draw(st.integers(100, 599)), b"Whatever")
    name = draw(st.text(TCHARS, min_size=1, max_size=10)).encode()
    line = b"X-" + name + b": " + b"v" * draw(st.integers(0, 500)) + b"\r\n"
    while len(head) <= MAX_REPLY_HEAD_SIZE + 10:
        head += line
    return infos, head


@settings(max_examples=100, deadline=None)
@given(heads=endless_heads(), data=st.data())
def test_http_buffers_at_most_one_maximal_head(heads, data):
    infos, head = heads
    machine = HttpConnectClient("example.com", 443)
    run = drive(machine, data.draw(chunked(infos + head)))
    assert_failed_for_good(machine, run)
    for fed, _, _ in run.steps:
        # Still undecided after this chunk: the open head must still fit.
        assert fed - len(infos) < MAX_REPLY_HEAD_SIZE


@settings(max_examples=200, deadline=None)
@given(
    protocol=st.sampled_from(["socks4", "socks5"]),
    garbage=st.binary(min_size=SOCKS5_LONGEST_REPLY, max_size=SOCKS5_LONGEST_REPLY + 50),
    data=st.data(),
)
def test_socks_decides_within_the_longest_reply(protocol, garbage, data):
    if protocol == "socks4":
        machine, bound = Socks4Client("192.0.2.7", 443), SOCKS4_REPLY_SIZE
    else:
        machine, bound = Socks5Client("example.com", 443, username="alice", password="pw"), SOCKS5_LONGEST_REPLY
    # Steer part of the examples past the first checks, into the longer replies.
    prefix = data.draw(st.sampled_from([b"", b"\x05\x02\x01\x00", b"\x05\x00\x05\x00\x00\x03\xff", b"\x00\x5a"]))
    run = drive(machine, data.draw(chunked(prefix + garbage)))
    assert run.error is not None or machine.established
    for fed, _, established in run.steps:
        assert established or fed < bound
