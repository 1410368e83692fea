import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.errors import (
    LocalProtocolError,
    ProxyRefused,
    RemoteProtocolError,
)
from relay.proto.socks import Socks4Client, Socks5Client
from tests.proto.support import (
    AUTH_OK,
    METHOD_NO_AUTH,
    METHOD_USER_PASS,
    PASSWORD,
    REPLY_DOMAIN,
    REPLY_IPV4,
    REPLY_IPV6,
    SOCKS4_GRANTED,
    feed,
    garbage_run,
    outcome,
    split_at,
    started,
)


def socks5(**credentials) -> Socks5Client:
    return started(Socks5Client("example.com", 443, **credentials))


def socks5_at_reply() -> Socks5Client:
    machine = socks5()
    machine.receive_data(METHOD_NO_AUTH)
    machine.data_to_send()
    return machine


def socks4() -> Socks4Client:
    return started(Socks4Client("192.0.2.7", 443))


# --- SOCKS5 requests -------------------------------------------------------------


def test_socks5_greeting_without_credentials_offers_no_auth_only():
    machine = Socks5Client("example.com", 443)
    assert machine.data_to_send() == b"\x05\x01\x00"
    assert machine.data_to_send() == b""


def test_socks5_greeting_with_credentials_offers_both():
    machine = Socks5Client("example.com", 443, username="alice", password="s3cret")
    assert machine.data_to_send() == b"\x05\x02\x00\x02"


@pytest.mark.parametrize(
    ("host", "port", "request_bytes"),
    [
        ("10.0.0.1", 443, b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb"),
        ("example.com", 80, b"\x05\x01\x00\x03\x0bexample.com\x00\x50"),
        ("::1", 65535, b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\xff\xff"),
        ("2001:db8::2", 1, b"\x05\x01\x00\x04\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x02\x00\x01"),
    ],
)
def test_socks5_connect_request(host, port, request_bytes):
    machine = Socks5Client(host, port)
    assert machine.data_to_send() == b"\x05\x01\x00"
    machine.receive_data(METHOD_NO_AUTH)
    assert machine.data_to_send() == request_bytes
    assert not machine.established


def test_socks5_messages_are_never_pipelined():
    machine = Socks5Client("example.com", 443, username="alice", password="s3cret")
    assert machine.data_to_send() == b"\x05\x02\x00\x02"
    machine.receive_data(b"\x05")
    assert machine.data_to_send() == b""
    machine.receive_data(b"\x02")
    assert machine.data_to_send() == b"\x01\x05alice\x06s3cret"
    assert machine.data_to_send() == b""
    machine.receive_data(b"\x01")
    assert machine.data_to_send() == b""
    machine.receive_data(b"\x00")
    assert machine.data_to_send() == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    machine.receive_data(REPLY_IPV4)
    assert machine.established
    assert machine.data_to_send() == b""


def test_socks5_credentials_may_be_chosen_away():
    machine = socks5(username="alice", password="s3cret")
    machine.receive_data(METHOD_NO_AUTH)
    assert machine.data_to_send() == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


def test_socks5_credentials_are_utf8_and_may_be_empty():
    machine = socks5(username="é", password="")
    machine.receive_data(METHOD_USER_PASS)
    assert machine.data_to_send() == b"\x01\x02\xc3\xa9\x00"


def test_socks5_longest_names_are_accepted():
    machine = socks5(username="u" * 255, password="p" * 255)
    machine.receive_data(METHOD_USER_PASS)
    assert machine.data_to_send() == b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    Socks5Client("h" * 255, 443)


@pytest.mark.parametrize("port", [0, -1, 65536, "443", True, None])
def test_socks5_bad_port_is_local_error(port):
    with pytest.raises(LocalProtocolError):
        Socks5Client("example.com", port)


@pytest.mark.parametrize("host", ["", "h" * 256, "é.example", "bad\x00host", "fe80::1%eth0"])
def test_socks5_bad_host_is_local_error(host):
    with pytest.raises(LocalProtocolError):
        Socks5Client(host, 443)


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "u" * 256, "password": "pw"},
        {"username": "user", "password": "p" * 256},
        {"username": "é" * 128, "password": "pw"},  # 256 bytes once encoded
        {"username": "alice"},
        {"password": "pw"},
    ],
)
def test_socks5_bad_credentials_are_local_error(credentials):
    with pytest.raises(LocalProtocolError) as info:
        Socks5Client("example.com", 443, **credentials)
    assert "p" * 256 not in str(info.value)


# --- SOCKS5 success ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "bound"),
    [
        (REPLY_IPV4, ("192.0.2.7", 8080)),
        (REPLY_DOMAIN, ("example.net", 80)),
        (REPLY_IPV6, ("2001:db8::1", 443)),
        (b"\x05\x00\x00\x03\x00\x00\x00", ("", 0)),
        (b"\x05\x00\x00\x03\xff" + b"d" * 255 + b"\x12\x34", ("d" * 255, 0x1234)),
        (b"\x05\x00\x7f\x01\x00\x00\x00\x00\x00\x00", ("0.0.0.0", 0)),  # RSV is ignored
    ],
)
def test_socks5_reply_address_types(reply, bound):
    whole = socks5_at_reply()
    whole.receive_data(reply)
    assert whole.established
    assert whole.bound_address == bound
    assert whole.trailing_data == b""
    whole.receive_data(b"tunnel")
    assert whole.trailing_data == b"tunnel"
    assert whole.bound_address == bound

    bytewise = socks5_at_reply()
    for index in range(len(reply)):
        assert not bytewise.established
        assert bytewise.bound_address is None
        bytewise.receive_data(reply[index : index + 1])
    assert bytewise.established
    assert bytewise.bound_address == bound


def test_socks5_auth_reply_with_version_5_is_accepted():
    machine = socks5(username="alice", password="s3cret")
    machine.receive_data(METHOD_USER_PASS)
    machine.receive_data(b"\x05\x00")
    assert machine.data_to_send().endswith(b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")


def test_socks5_server_answering_ahead_is_tolerated():
    machine = socks5(username="alice", password="s3cret")
    machine.receive_data(METHOD_USER_PASS + AUTH_OK + REPLY_IPV4 + b"tail")
    assert machine.established
    assert machine.trailing_data == b"tail"
    assert machine.data_to_send() == (b"\x01\x05alice\x06s3cret" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")


# --- SOCKS5 refusals and malformed replies ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "host_unreachable"),
    [
        (1, "socks5-general-failure", False),
        (2, "socks5-not-allowed", False),
        (3, "socks5-network-unreachable", True),
        (4, "socks5-host-unreachable", True),
        (5, "socks5-connection-refused", False),
        (6, "socks5-ttl-expired", False),
        (7, "socks5-command-not-supported", False),
        (8, "socks5-address-type-not-supported", False),
        (9, "socks5-error-9", False),
        (255, "socks5-error-255", False),
    ],
)
def test_socks5_refusal_codes(code, reason, host_unreachable):
    machine = socks5_at_reply()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(bytes([5, code]) + REPLY_IPV4[2:])
    assert info.value.reason == reason
    assert info.value.host_unreachable is host_unreachable
    assert "example.com:443" in str(info.value)
    assert not machine.established


def test_socks5_refusal_is_reported_before_the_rest_of_the_reply():
    machine = socks5_at_reply()
    with pytest.raises(ProxyRefused):
        machine.receive_data(b"\x05\x05")


def test_socks5_no_acceptable_method():
    machine = socks5()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(b"\x05\xff")
    assert info.value.reason == "socks5-no-acceptable-method"
    assert machine.bound_address is None


def test_socks5_auth_failure():
    machine = socks5(username="alice", password=PASSWORD)
    machine.receive_data(METHOD_USER_PASS)
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(b"\x01\x01")
    assert info.value.reason == "socks5-auth-failed"
    assert info.value.host_unreachable is False


@pytest.mark.parametrize(
    "method_reply",
    [b"\x05\x02", b"\x05\x01", b"\x05\x80", b"\x04\x00", b"\x00\x5a", b"HTTP/1.1 400"],
)
def test_socks5_bad_method_reply(method_reply):
    machine = socks5()
    with pytest.raises(RemoteProtocolError) as info:
        machine.receive_data(method_reply)
    assert not isinstance(info.value, ProxyRefused)


def test_socks5_bad_auth_reply_version():
    machine = socks5(username="alice", password="s3cret")
    machine.receive_data(METHOD_USER_PASS)
    with pytest.raises(RemoteProtocolError):
        machine.receive_data(b"\x02\x00")


@pytest.mark.parametrize(
    "reply",
    [
        b"\x04\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # version
        b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # version
        b"\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # ATYP 0
        b"\x05\x00\x00\x02\x00\x00\x00\x00\x00\x00",  # ATYP 2
        b"\x05\x00\x00\x05\x00\x00\x00\x00\x00\x00",  # ATYP 5
        b"\x05\x00\x00\xff\x00\x00\x00\x00\x00\x00",  # ATYP 255
    ],
)
def test_socks5_malformed_reply(reply):
    machine = socks5_at_reply()
    with pytest.raises(RemoteProtocolError) as info:
        machine.receive_data(reply)
    assert not isinstance(info.value, ProxyRefused)


@pytest.mark.parametrize(
    "transcript",
    [
        b"",
        b"\x05",
        METHOD_NO_AUTH,
        METHOD_NO_AUTH + REPLY_IPV4[:-1],
        METHOD_NO_AUTH + REPLY_DOMAIN[:4],
        METHOD_NO_AUTH + REPLY_DOMAIN[:5],
        METHOD_NO_AUTH + REPLY_IPV6[:-3],
        METHOD_USER_PASS,
        METHOD_USER_PASS + b"\x01",
    ],
)
def test_socks5_truncated_then_eof(transcript):
    machine = socks5(username="alice", password="s3cret")
    feed(machine, split_at(transcript, []))
    with pytest.raises(RemoteProtocolError, match="closed"):
        machine.receive_data(b"")
    assert not machine.established


# --- SOCKS4 / SOCKS4a requests -------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_args", "request_bytes"),
    [
        (("192.0.2.7", 443), b"\x04\x01\x01\xbb\xc0\x00\x02\x07\x00"),
        (("10.0.0.1", 80, "bob"), b"\x04\x01\x00\x50\x0a\x00\x00\x01bob\x00"),
        (("10.0.0.1", 80, "bob", True), b"\x04\x01\x00\x50\x0a\x00\x00\x01bob\x00"),
        (("example.com", 443, "", True), b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"),
        (
            ("example.com", 1, "bob", True),
            b"\x04\x01\x00\x01\x00\x00\x00\x01bob\x00example.com\x00",
        ),
    ],
)
def test_socks4_request(client_args, request_bytes):
    machine = Socks4Client(*client_args)
    assert machine.data_to_send() == request_bytes
    assert machine.data_to_send() == b""


@pytest.mark.parametrize(
    ("host", "use_4a", "message"),
    [
        ("example.com", False, "SOCKS4a"),
        ("::1", False, "IPv6"),
        ("2001:db8::1", True, "IPv6"),
        ("", True, "hostname"),
        ("h" * 256, True, "hostname"),
        ("bad\x00host", True, "NUL"),
        ("é.example", True, "ASCII"),
        # A SOCKS4a proxy reads 0.0.0.x (x != 0) as "a hostname follows the user id".
        ("0.0.0.1", False, "SOCKS4a"),
        ("0.0.0.255", True, "SOCKS4a"),
    ],
)
def test_socks4_unsendable_host(host, use_4a, message):
    with pytest.raises(LocalProtocolError, match=message):
        Socks4Client(host, 443, use_4a=use_4a)


@pytest.mark.parametrize("port", [0, 65536, "80"])
def test_socks4_bad_port(port):
    with pytest.raises(LocalProtocolError):
        Socks4Client("10.0.0.1", port)


def test_socks4_address_0_0_0_0_is_not_a_marker():
    assert Socks4Client("0.0.0.0", 80).data_to_send() == b"\x04\x01\x00\x50\x00\x00\x00\x00\x00"


def test_socks4_user_id_with_nul():
    with pytest.raises(LocalProtocolError, match="NUL"):
        Socks4Client("10.0.0.1", 80, user_id="bo\x00b")


# --- SOCKS4 replies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "host_unreachable"),
    [
        (91, "socks4-rejected", True),
        (92, "socks4-identd-unreachable", False),
        (93, "socks4-identd-mismatch", False),
    ],
)
def test_socks4_refusals(code, reason, host_unreachable):
    machine = socks4()
    with pytest.raises(ProxyRefused) as info:
        machine.receive_data(bytes([0, code]) + b"\x00" * 6)
    assert info.value.reason == reason
    assert info.value.host_unreachable is host_unreachable
    assert "192.0.2.7:443" in str(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        b"\x05\x5a\x00\x00\x00\x00\x00\x00",  # version
        b"\x01\x5a\x00\x00\x00\x00\x00\x00",  # version
        b"\x00\x00\x00\x00\x00\x00\x00\x00",  # unknown code
        b"\x00\x5e\x00\x00\x00\x00\x00\x00",  # unknown code
        b"\x05\x00",  # a SOCKS5 answer
    ],
)
def test_socks4_malformed_reply(reply):
    machine = socks4()
    with pytest.raises(RemoteProtocolError) as info:
        machine.receive_data(reply)
    assert not isinstance(info.value, ProxyRefused)


@pytest.mark.parametrize("received", [b"", b"\x00", b"\x00\x5a", SOCKS4_GRANTED[:7]])
def test_socks4_truncated_then_eof(received):
    machine = socks4()
    feed(machine, split_at(received, []))
    with pytest.raises(RemoteProtocolError, match="closed"):
        machine.receive_data(b"")


# --- credentials never leak -------------------------------------------------------------------


def test_socks5_oversized_password_error_does_not_echo_it():
    secret = PASSWORD * 30
    with pytest.raises(LocalProtocolError) as info:
        Socks5Client("example.com", 443, username="alice", password=secret)
    assert PASSWORD not in str(info.value)


# --- properties ----------------------------------------------------------------------------------


def socks5_reply(address_type: int, address: bytes, port: int) -> bytes:
    if address_type == 3:
        address = bytes([len(address)]) + address
    return bytes([5, 0, 0, address_type]) + address + port.to_bytes(2, "big")


socks5_replies = st.one_of(
    st.builds(socks5_reply, st.just(1), st.binary(min_size=4, max_size=4), st.integers(0, 65535)),
    st.builds(socks5_reply, st.just(3), st.binary(max_size=255), st.integers(0, 65535)),
    st.builds(socks5_reply, st.just(4), st.binary(min_size=16, max_size=16), st.integers(0, 65535)),
    st.builds(lambda code: bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]), st.integers(1, 255)),
)


def socks5_outcome(chunks: list[bytes]):
    machine = socks5(username="alice", password="s3cret")
    return (*outcome(machine, chunks), machine.bound_address)


@settings(max_examples=200, deadline=None)
@given(
    authenticate=st.booleans(),
    reply=socks5_replies,
    trailing=st.binary(max_size=40),
    data=st.data(),
)
def test_socks5_any_split_gives_the_whole_feed_result(authenticate, reply, trailing, data):
    transcript = (METHOD_USER_PASS + AUTH_OK if authenticate else METHOD_NO_AUTH) + reply + trailing
    cuts = data.draw(st.lists(st.integers(0, len(transcript)), max_size=len(transcript)))
    result = socks5_outcome(split_at(transcript, cuts))
    assert result == socks5_outcome([transcript])
    if reply[1] == 0:
        assert result[:3] == ("done", True, trailing)


@settings(max_examples=200, deadline=None)
@given(
    reply=st.builds(
        lambda version, code, rest: bytes([version, code]) + rest,
        st.sampled_from([0, 4]),
        st.sampled_from([90, 91, 92, 93]),
        st.binary(min_size=6, max_size=6),
    ),
    trailing=st.binary(max_size=40),
    data=st.data(),
)
def test_socks4_any_split_gives_the_whole_feed_result(reply, trailing, data):
    message = reply + trailing
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=len(message)))
    result = outcome(socks4(), split_at(message, cuts))
    assert result == outcome(socks4(), [message])
    if reply[1] == 90:
        assert result == ("done", True, trailing)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from([METHOD_NO_AUTH, METHOD_USER_PASS, METHOD_USER_PASS + AUTH_OK]),
    garbage=st.binary(max_size=300),
    eof=st.booleans(),
    data=st.data(),
)
def test_socks5_garbage_deeper_in_the_handshake(prefix, garbage, eof, data):
    # Pure garbage rarely gets past the greeting; start it deeper in the handshake.
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=20))
    machine = socks5(username="alice", password="s3cret")
    machine.receive_data(prefix)
    garbage_run(machine, garbage, cuts, eof)


# --- pipelined -------------------------------------------------------------------------------------

PIPELINED_AUTH = b"\x05\x01\x02" + b"\x01\x05alice\x06s3cret" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


def pipelined(**credentials) -> Socks5Client:
    return Socks5Client("example.com", 443, pipelined=True, **credentials)


@pytest.mark.parametrize(
    ("credentials", "sent"),
    [
        ({}, b"\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbb"),
        ({"username": "alice", "password": "s3cret"}, PIPELINED_AUTH),
    ],
    ids=["no-auth", "auth"],
)
def test_socks5_pipelined_sends_everything_in_one_write_and_offers_only_the_method_it_follows_with(credentials, sent):
    machine = pipelined(**credentials)
    assert machine.data_to_send() == sent
    assert machine.pipelining_unconfirmed
    transcript = (METHOD_USER_PASS + AUTH_OK if credentials else METHOD_NO_AUTH) + REPLY_IPV4 + b"SSH-2.0-x"
    for chunks in ([transcript], [bytes([byte]) for byte in transcript]):
        machine = started(pipelined(**credentials))
        for chunk in chunks:
            machine.receive_data(chunk)
            assert machine.data_to_send() == b""  # nothing more, ever: it all went out first
        assert machine.established and machine.trailing_data == b"SSH-2.0-x"
        assert not machine.pipelining_unconfirmed


def test_socks5_pipelining_is_confirmed_by_the_first_byte_of_the_requests_reply():
    machine = started(pipelined(username="alice", password="s3cret"))
    for step in (METHOD_USER_PASS, AUTH_OK):
        machine.receive_data(step)
        assert machine.pipelining_unconfirmed  # a proxy that took the greeting alone answers this far too
    machine.receive_data(REPLY_IPV4[:1])
    assert not machine.pipelining_unconfirmed and not machine.established


@pytest.mark.parametrize(
    ("received", "error", "unconfirmed"),
    [
        (METHOD_NO_AUTH, RemoteProtocolError, True),  # offered only username/password
        (METHOD_USER_PASS, None, True),
        (METHOD_USER_PASS + AUTH_OK, None, True),
        (METHOD_USER_PASS + AUTH_OK + b"\x05\x05\x00\x01\0\0\0\0\0\0", ProxyRefused, False),
    ],
)
def test_socks5_pipelined_failures_say_whether_pipelining_may_be_why(received, error, unconfirmed):
    machine = started(pipelined(username="alice", password="s3cret"))
    if error:
        with pytest.raises(error):
            machine.receive_data(received)
    else:
        machine.receive_data(received)
        with pytest.raises(RemoteProtocolError):
            machine.receive_data(b"")  # the proxy closed
    assert machine.pipelining_unconfirmed is unconfirmed


def test_socks5_one_message_at_a_time_is_never_unconfirmed_pipelining():
    machine = socks5()
    with pytest.raises(RemoteProtocolError):
        machine.receive_data(b"")
    assert not machine.pipelining_unconfirmed


@settings(max_examples=200, deadline=None)
@given(authenticate=st.booleans(), reply=socks5_replies, trailing=st.binary(max_size=40), data=st.data())
def test_socks5_pipelined_any_split_gives_the_whole_feed_result(authenticate, reply, trailing, data):
    credentials = {"username": "alice", "password": "s3cret"} if authenticate else {}
    transcript = (METHOD_USER_PASS + AUTH_OK if authenticate else METHOD_NO_AUTH) + reply + trailing
    cuts = data.draw(st.lists(st.integers(0, len(transcript)), max_size=len(transcript)))
    result = outcome(started(pipelined(**credentials)), split_at(transcript, cuts))
    assert result == outcome(started(pipelined(**credentials)), [transcript])
    if reply[1] == 0:
        assert result == ("done", True, trailing)
