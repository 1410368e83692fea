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
from tests.proto.support import (
    OK_REPLY,
    PASSWORD,
    assert_no_secret,
    feed,
    outcome,
    split_at,
    started,
)


def client() -> HttpConnectClient:
    return started(HttpConnectClient("example.com", 443))


# --- the request -------------------------------------------------------------


def test_request_for_hostname():
    machine = HttpConnectClient("example.com", 443)
    assert machine.data_to_send() == (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
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
    [
        "",
        "a b",
        "evil.com\r\nX-Injected: 1",
        "tab\there",
        "bad\x00host",
        "é.example",
        "user@host",
        "a/b",
        "host:80",
        "[::1]",
        "x" * 256,
        "fe80::1%eth0",
    ],
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
    [
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 299 Whatever\r\nVia: proxy\r\n\r\n",
        b"HTTP/1.1 200 OK\n\n",
    ],
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
    [
        (400, False),
        (403, False),
        (404, True),  # privoxy's "No such domain"
        (405, False),
        (500, True),  # squid's DNS timeout
        (502, True),
        (503, True),
        (504, True),
        (301, False),
    ],
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


# --- credentials never leak ------------------------------------------------------


def test_password_goes_out_only_in_base64():
    machine = HttpConnectClient("example.com", 443, username="alice", password=PASSWORD)
    assert PASSWORD.encode() not in machine.data_to_send()


def test_local_errors_never_show_credentials():
    with pytest.raises(LocalProtocolError) as info:
        HttpConnectClient("example.com", 443, username="al:ice", password=PASSWORD)
    assert_no_secret(str(info.value))


# --- properties ----------------------------------------------------------------------


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
    assert outcome(client(), split_at(message, cuts)) == outcome(client(), split_at(message, []))


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.lists(
        st.sampled_from(
            [
                b"HTTP/1.1 ",
                b"200",
                b"407",
                b"100",
                b" OK",
                b"\r\n",
                b"\n",
                b": ",
                b"Content-Length",
                b"Transfer-Encoding",
                b"chunked",
                b"5",
                b"\x00",
                b"\xff",
                b" ",
            ]
        ),
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
    assert outcome(client(), chunks) == outcome(client(), split_at(garbage, []))


# --- early data ----------------------------------------------------------------


HELLO = b"\x16\x03\x01\x00\x05hello"


def test_early_data_follows_the_request_in_one_write_with_connection_close():
    machine = HttpConnectClient("example.com", 443, username="alice", password="s3cret", early_data=HELLO)
    assert machine.data_to_send() == (
        b"CONNECT example.com:443 HTTP/1.1\r\n"
        b"Host: example.com:443\r\n"
        b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"
        b"Connection: close\r\n"
        b"\r\n" + HELLO
    )
    assert machine.data_to_send() == b""


def test_without_early_data_no_connection_close():
    sent = HttpConnectClient("example.com", 443).data_to_send()
    assert b"connection" not in sent.lower() and sent.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("split", [None, 1, 17])
def test_with_early_data_a_2xx_still_opens_the_tunnel_with_what_follows(split):
    machine = HttpConnectClient("example.com", 443, early_data=HELLO)
    machine.data_to_send()
    reply = OK_REPLY + b"\x16\x03\x03\x00\x02hi"
    for chunk in [reply] if split is None else [reply[:split], reply[split:]]:
        machine.receive_data(chunk)
    assert machine.established and machine.trailing_data == b"\x16\x03\x03\x00\x02hi"


def test_with_early_data_a_refusal_is_a_refusal_whatever_follows_it():
    machine = HttpConnectClient("example.com", 443, early_data=HELLO)
    machine.data_to_send()
    with pytest.raises(ProxyRefused) as refused:
        machine.receive_data(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc")
    assert refused.value.reason == "http-503" and refused.value.host_unreachable
    assert not machine.established
