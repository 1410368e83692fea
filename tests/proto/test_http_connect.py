import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.errors import (
    LocalProtocolError,
    ProtocolError,
    ProxyRefused,
    RemoteProtocolError,
)
from relay.proto.http_connect import MAX_REPLY_HEAD_SIZE, HttpConnectClient

PASSWORD = "s3cret-Pa55"
OK_REPLY = b"HTTP/1.1 200 Connection established\r\n\r\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets, without empty pieces (b"" means EOF)."""
    points = sorted(set(cuts))
    bounds = zip([0, *points], [*points, len(data)])
    return [data[start:end] for start, end in bounds if end > start]


def feed(machine: HttpConnectClient, chunks: list[bytes]) -> None:
    for chunk in chunks:
        machine.receive_data(chunk)


def client() -> HttpConnectClient:
    machine = HttpConnectClient("example.com", 443)
    machine.data_to_send()
    return machine


# --- the request -------------------------------------------------------------


def test_request_for_hostname():
    machine = HttpConnectClient("example.com", 443)
    assert machine.data_to_send() == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert machine.data_to_send() == b""
    assert not machine.established


def test_request_for_ipv4():
    assert HttpConnectClient("192.0.2.7", 8080).data_to_send() == (
        b"CONNECT 192.0.2.7:8080 HTTP/1.1\r\nHost: 192.0.2.7:8080\r\n\r\n"
    )


def test_request_for_ipv6_uses_brackets():
    assert HttpConnectClient("2001:db8::1", 443).data_to_send() == (
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n"
    )


def test_request_with_basic_credentials():
    machine = HttpConnectClient("example.com", 443, username="alice", password="s3cret")
    assert machine.data_to_send() == (
        b"CONNECT example.com:443 HTTP/1.1\r\n"
        b"Host: example.com:443\r\n"
        b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"
        b"\r\n"
    )


def test_credentials_are_utf8():
    machine = HttpConnectClient("example.com", 443, username="é", password="ü")
    # base64("é:ü" in UTF-8) == base64(b"\xc3\xa9:\xc3\xbc")
    assert b"Proxy-Authorization: Basic w6k6w7w=\r\n" in machine.data_to_send()


@pytest.mark.parametrize("port", [0, -1, 65536, "443", 443.0, True, None])
def test_bad_port_is_local_error(port):
    with pytest.raises(LocalProtocolError):
        HttpConnectClient("example.com", port)


@pytest.mark.parametrize(
    "host",
    ["", "a b", "evil.com\r\nX-Injected: 1", "tab\there", "bad\x00host", "é.example",
     "user@host", "a/b", "host:80", "[::1]", "x" * 256, "fe80::1%eth0"],
)
def test_bad_host_is_local_error(host):
    with pytest.raises(LocalProtocolError):
        HttpConnectClient(host, 443)


def test_longest_hostname_is_accepted():
    HttpConnectClient("x" * 255, 443)


@pytest.mark.parametrize(
    "credentials",
    [{"username": "alice"}, {"password": "pw"}, {"username": "a:b", "password": "pw"}],
)
def test_bad_credentials_are_local_error(credentials):
    with pytest.raises(LocalProtocolError):
        HttpConnectClient("example.com", 443, **credentials)


# --- success -----------------------------------------------------------------


def test_success_fed_whole():
    machine = client()
    machine.receive_data(OK_REPLY)
    assert machine.established
    assert machine.trailing_data == b""
    assert machine.data_to_send() == b""


def test_success_fed_one_byte_at_a_time():
    machine = client()
    for index in range(len(OK_REPLY)):
        assert not machine.established
        machine.receive_data(OK_REPLY[index : index + 1])
    assert machine.established
    assert machine.trailing_data == b""


def test_trailing_data_in_the_same_feed():
    machine = client()
    machine.receive_data(OK_REPLY + b"SSH-2.0-OpenSSH\r\n")
    assert machine.established
    assert machine.trailing_data == b"SSH-2.0-OpenSSH\r\n"


def test_trailing_data_fed_later_is_appended():
    machine = client()
    machine.receive_data(OK_REPLY + b"one")
    machine.receive_data(b"two")
    machine.receive_data(b"")
    machine.receive_data(b"three")
    assert machine.trailing_data == b"onetwothree"


def test_trailing_data_is_empty_before_success():
    machine = client()
    machine.receive_data(b"HTTP/1.1 200 OK\r\n")
    assert not machine.established
    assert machine.trailing_data == b""


def test_content_length_on_2xx_does_not_swallow_tunnel_data():
    machine = client()
    machine.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world")
    assert machine.established
    assert machine.trailing_data == b"hello world"


def test_chunked_2xx_does_not_swallow_tunnel_data():
    machine = client()
    machine.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
    assert machine.trailing_data == b"5\r\nhello"


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.1 200\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n",
     b"HTTP/1.1 299 Whatever\r\nVia: proxy\r\n\r\n", b"HTTP/1.1 200 OK\n\n"],
)
def test_any_2xx_establishes(reply):
    machine = client()
    machine.receive_data(reply + b"x")
    assert machine.established
    assert machine.trailing_data == b"x"


def test_informational_responses_are_skipped():
    machine = client()
    machine.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert not machine.established
    machine.receive_data(b"HTTP/1.1 102 Processing\r\n\r\n" + OK_REPLY + b"tail")
    assert machine.established
    assert machine.trailing_data == b"tail"


def test_reply_head_of_exactly_the_limit_is_accepted():
    start, end = b"HTTP/1.1 200 OK\r\nX-Pad: ", b"\r\n\r\n"
    head = start + b"a" * (MAX_REPLY_HEAD_SIZE - len(start) - len(end)) + end
    assert len(head) == MAX_REPLY_HEAD_SIZE
    machine = client()
    feed(machine, split_at(head + b"tail", list(range(0, len(head), 1000))))
    assert machine.established
    assert machine.trailing_data == b"tail"


# --- refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "host_unreachable"),
    [(400, False), (403, False), (404, False), (405, False), (500, False),
     (502, True), (503, True), (504, True), (301, False)],
)
def test_non_2xx_is_refusal(status, host_unreachable):
    machine = client()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(f"HTTP/1.1 {status} Nope\r\nContent-Length: 4\r\n\r\nbody".encode())
    assert info.value.reason == f"http-{status}"
    assert info.value.host_unreachable is host_unreachable
    assert f"example.com:443: {status} Nope" in str(info.value)
    assert not machine.established


def test_407_says_authentication_is_needed():
    machine = client()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="proxy"\r\n'
            b"Content-Length: 6\r\n\r\ndenied"
        )
    assert info.value.reason == "http-407"
    assert info.value.host_unreachable is False
    assert "authentication" in str(info.value)


def test_refusal_body_never_needs_to_arrive():
    machine = client()
    with pytest.raises(ProxyRefused):
        machine.receive_data(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 1000\r\n\r\npartial")


def test_refusal_after_informational_response():
    machine = client()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n")
    assert info.value.reason == "http-403"


# --- malformed replies ---------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"\x05\x00",
    ],
)
def test_malformed_reply_is_remote_error(reply):
    machine = client()
    with pytest.raises(RemoteProtocolError) as info:
        feed(machine, [reply, b""])
    assert not isinstance(info.value, ProxyRefused)
    assert not machine.established


def test_h11_error_is_chained():
    machine = client()
    with pytest.raises(RemoteProtocolError) as info:
        machine.receive_data(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert info.value.__cause__ is not None


def test_eof_before_any_reply():
    machine = client()
    with pytest.raises(RemoteProtocolError, match="closed"):
        machine.receive_data(b"")


def test_eof_before_end_of_head():
    machine = client()
    machine.receive_data(b"HTTP/1.1 200 OK\r\nVia: proxy\r\n")
    with pytest.raises(RemoteProtocolError, match="closed"):
        machine.receive_data(b"")


def test_incomplete_oversized_head():
    machine = client()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        machine.receive_data(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_REPLY_HEAD_SIZE)


@pytest.mark.parametrize("chunk_size", [1 << 20, 4096, 777])
def test_complete_oversized_head_is_rejected_however_split(chunk_size):
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_REPLY_HEAD_SIZE + b"\r\n\r\n"
    machine = client()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(machine, split_at(head, list(range(0, len(head), chunk_size))))
    assert not machine.established


def test_head_one_byte_over_the_limit_is_rejected():
    start, end = b"HTTP/1.1 200 OK\r\nX-Pad: ", b"\r\n\r\n"
    head = start + b"a" * (MAX_REPLY_HEAD_SIZE + 1 - len(start) - len(end)) + end
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        client().receive_data(head)


def test_many_small_informational_heads_are_not_oversized():
    informational = b"HTTP/1.1 100 Continue\r\n\r\n" * 1000
    machine = client()
    machine.receive_data(informational + OK_REPLY)
    assert machine.established


# --- a failed machine stays failed -------------------------------------------------


def test_after_refusal_every_call_raises_again():
    machine = client()
    with pytest.raises(ProxyRefused):
        machine.receive_data(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    with pytest.raises(ProxyRefused):
        machine.receive_data(OK_REPLY)
    with pytest.raises(ProxyRefused):
        machine.data_to_send()
    assert not machine.established


def test_after_malformed_reply_every_call_raises_again():
    machine = client()
    with pytest.raises(RemoteProtocolError):
        machine.receive_data(b"garbage\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        machine.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        machine.data_to_send()


# --- credentials never leak ------------------------------------------------------


def secret_bearing_client() -> HttpConnectClient:
    return HttpConnectClient("example.com", 443, username="alice", password=PASSWORD)


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text
    assert "Proxy-Authorization" not in text
    assert "YWxpY2U6" not in text  # start of base64("alice:...")


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
     b"HTTP/1.1 403 Forbidden\r\n\r\n",
     b"HTTP/1.1 2000 OK\r\n\r\n",
     b"x" * (MAX_REPLY_HEAD_SIZE + 1),
     b""],
)
def test_errors_and_repr_never_show_credentials(reply):
    machine = secret_bearing_client()
    assert_no_secret(repr(machine))
    assert PASSWORD.encode() not in machine.data_to_send()  # only base64 goes out
    with pytest.raises(ProtocolError) as info:
        machine.receive_data(reply)
    assert_no_secret(str(info.value))
    assert_no_secret(repr(info.value))
    assert_no_secret(repr(machine))
    assert_no_secret(str(machine))


def test_established_repr_never_shows_credentials():
    machine = secret_bearing_client()
    machine.receive_data(OK_REPLY)
    assert_no_secret(repr(machine))
    assert "established" in repr(machine)


def test_local_errors_never_show_credentials():
    with pytest.raises(LocalProtocolError) as info:
        HttpConnectClient("example.com", 443, username="al:ice", password=PASSWORD)
    assert_no_secret(str(info.value))


# --- properties ----------------------------------------------------------------------


def outcome(chunks: list[bytes]):
    machine = client()
    try:
        feed(machine, chunks)
    except ProxyRefused as exc:
        return ("refused", exc.reason)
    except RemoteProtocolError:
        return ("malformed",)
    return ("done", machine.established, machine.trailing_data)


replies = st.sampled_from(
    [
        OK_REPLY,
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nVia: 1.1 squid\r\n\r\n",
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ]
)


@settings(max_examples=200, deadline=None)
@given(reply=replies, trailing=st.binary(max_size=40), data=st.data())
def test_any_split_gives_the_whole_feed_result(reply, trailing, data):
    message = reply + trailing
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=len(message)))
    assert outcome(split_at(message, cuts)) == outcome(split_at(message, []))


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=300), eof=st.booleans(), data=st.data())
def test_garbage_never_raises_foreign_exceptions(garbage, eof, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=20))
    machine = client()
    try:
        feed(machine, split_at(garbage, cuts) + ([b""] if eof else []))
    except ProtocolError:
        return
    # Whatever the machine keeps as tunnel data came from the end of the input.
    assert garbage.endswith(machine.trailing_data)
    if not machine.established:
        assert machine.trailing_data == b""


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.lists(
        st.sampled_from([b"HTTP/1.1 ", b"200", b"407", b"100", b" OK", b"\r\n", b"\n",
                         b": ", b"Content-Length", b"Transfer-Encoding", b"chunked", b"5",
                         b"\x00", b"\xff", b" "]),
        max_size=30,
    ).map(b"".join),
    data=st.data(),
)
def test_http_like_garbage_never_raises_foreign_exceptions(garbage, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=20))
    chunks = split_at(garbage, cuts)
    machine = client()
    try:
        feed(machine, [*chunks, b""])
    except ProtocolError:
        pass
    assert outcome(chunks) == outcome(split_at(garbage, []))
