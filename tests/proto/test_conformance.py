"""What every handshake machine must do, whatever its protocol.

Each case is a machine plus everything a proxy sends it up to and including a
valid success reply; the protocol files test what is specific to each.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.errors import ProtocolError, ProxyRefused, RemoteProtocolError
from relay.proto.handshake import Handshake
from relay.proto.http_connect import MAX_REPLY_HEAD_SIZE, HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client
from tests.proto.support import (
    AUTH_OK,
    METHOD_NO_AUTH,
    METHOD_USER_PASS,
    OK_REPLY,
    PASSWORD,
    REPLY_DOMAIN,
    SOCKS4_GRANTED,
    assert_no_secret,
    feed,
    garbage_run,
    split_at,
    started,
)

SOCKS5_CONNECT_EXAMPLE_COM = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
SOCKS5_AUTH_ALICE = b"\x01\x05alice" + bytes([len(PASSWORD)]) + PASSWORD.encode()


@dataclass(frozen=True)
class Case:
    make: Callable[[], Handshake]
    success: bytes
    # What the client still sends while ``success`` arrives: SOCKS5 sends each
    # message only after the proxy answered the previous one.
    later_requests: bytes = b""

    def start(self) -> Handshake:
        return started(self.make())


CASES = {
    "http": Case(lambda: HttpConnectClient("example.com", 443), OK_REPLY),
    "http-basic-auth": Case(
        lambda: HttpConnectClient("example.com", 443, username="alice", password=PASSWORD),
        OK_REPLY,
    ),
    "socks4": Case(lambda: Socks4Client("192.0.2.7", 443), SOCKS4_GRANTED),
    # The spec says reply version 0, but some servers echo 4.
    "socks4-version-4-reply": Case(lambda: Socks4Client("192.0.2.7", 443), b"\x04" + SOCKS4_GRANTED[1:]),
    "socks5": Case(
        lambda: Socks5Client("example.com", 443),
        METHOD_NO_AUTH + REPLY_DOMAIN,
        SOCKS5_CONNECT_EXAMPLE_COM,
    ),
    "socks5-auth": Case(
        lambda: Socks5Client("example.com", 443, username="alice", password=PASSWORD),
        METHOD_USER_PASS + AUTH_OK + REPLY_DOMAIN,
        SOCKS5_AUTH_ALICE + SOCKS5_CONNECT_EXAMPLE_COM,
    ),
}
WITH_CREDENTIALS = ["http-basic-auth", "socks5-auth"]

each_case = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
each_case_with_credentials = pytest.mark.parametrize(
    "case", [CASES[name] for name in WITH_CREDENTIALS], ids=WITH_CREDENTIALS
)


# --- success -------------------------------------------------------------------


@each_case
def test_success_fed_whole(case):
    machine = case.start()
    machine.receive_data(case.success)
    assert machine.established
    assert machine.trailing_data == b""
    assert machine.data_to_send() == case.later_requests
    assert machine.data_to_send() == b""


@each_case
def test_success_fed_one_byte_at_a_time(case):
    machine = case.start()
    sent = b""
    for index in range(len(case.success)):
        assert not machine.established
        machine.receive_data(case.success[index : index + 1])
        sent += machine.data_to_send()
    assert machine.established
    assert machine.trailing_data == b""
    assert sent == case.later_requests


@each_case
def test_before_success_there_is_no_trailing_data_and_eof_is_an_error(case):
    for size in range(len(case.success)):
        machine = case.start()
        feed(machine, split_at(case.success[:size], []))
        assert not machine.established
        assert machine.trailing_data == b""
        with pytest.raises(RemoteProtocolError, match="closed"):
            machine.receive_data(b"")
        assert not machine.established


# --- trailing data ---------------------------------------------------------------


@each_case
def test_trailing_data_in_the_same_feed(case):
    machine = case.start()
    machine.receive_data(case.success + b"SSH-2.0-OpenSSH\r\n")
    assert machine.established
    assert machine.trailing_data == b"SSH-2.0-OpenSSH\r\n"
    assert machine.data_to_send() == case.later_requests


@each_case
def test_trailing_data_fed_later_is_appended(case):
    machine = case.start()
    machine.receive_data(case.success + b"one")
    assert machine.trailing_data == b"one"
    machine.receive_data(b"two")
    machine.receive_data(b"")  # EOF after success ends the tunnel, not the handshake
    machine.receive_data(b"three")
    assert machine.trailing_data == b"onetwothree"


# --- a failed machine stays failed -------------------------------------------------

FAILURES = {
    "http-refused": ("http", [b"HTTP/1.1 403 Forbidden\r\n\r\n"], ProxyRefused),
    "http-malformed": ("http", [b"garbage\r\n\r\n"], RemoteProtocolError),
    "socks4-malformed": ("socks4", [b"\x07", b"\x5a"], RemoteProtocolError),
    "socks5-refused": ("socks5", [b"\x05\xff"], ProxyRefused),
}


@pytest.mark.parametrize(("name", "chunks", "error_type"), FAILURES.values(), ids=FAILURES.keys())
def test_after_an_error_every_call_raises_it_again(name, chunks, error_type):
    case = CASES[name]
    machine = case.start()
    with pytest.raises(error_type) as info:
        feed(machine, chunks)
    for call in (
        lambda: machine.receive_data(case.success),
        lambda: machine.receive_data(b""),
        machine.data_to_send,
    ):
        with pytest.raises(error_type) as again:
            call()
        assert again.value is info.value
    assert not machine.established
    assert machine.trailing_data == b""
    assert "failed" in repr(machine)


# --- credentials never leak ------------------------------------------------------

LEAK_PROBES = {
    "http-407": ("http-basic-auth", b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"),
    "http-403": ("http-basic-auth", b"HTTP/1.1 403 Forbidden\r\n\r\n"),
    "http-malformed": ("http-basic-auth", b"HTTP/1.1 2000 OK\r\n\r\n"),
    "http-oversized": ("http-basic-auth", b"x" * (MAX_REPLY_HEAD_SIZE + 1)),
    "http-eof": ("http-basic-auth", b""),
    "socks5-no-method": ("socks5-auth", b"\x05\xff"),
    "socks5-auth-failed": ("socks5-auth", METHOD_USER_PASS + b"\x01\x01"),
    "socks5-truncated-auth": ("socks5-auth", METHOD_USER_PASS + b"\x09"),
    "socks5-refused": ("socks5-auth", METHOD_USER_PASS + AUTH_OK + b"\x05\x02"),
    "socks5-bad-address-type": ("socks5-auth", METHOD_USER_PASS + AUTH_OK + b"\x05\x00\x00\x09"),
    "socks5-truncated-reply": ("socks5-auth", METHOD_USER_PASS + AUTH_OK + b"\x05"),
}


@pytest.mark.parametrize(("name", "server_bytes"), LEAK_PROBES.values(), ids=LEAK_PROBES.keys())
def test_errors_and_repr_never_show_credentials(name, server_bytes):
    machine = CASES[name].start()
    assert_no_secret(repr(machine))
    # EOF right after, so that a truncated reply fails too.
    with pytest.raises(ProtocolError) as info:
        feed(machine, [server_bytes, b""])
    for text in (str(info.value), repr(info.value), repr(machine), str(machine)):
        assert_no_secret(text)


@each_case_with_credentials
def test_established_repr_never_shows_credentials(case):
    machine = case.start()
    machine.receive_data(case.success)
    assert machine.established
    assert_no_secret(repr(machine))
    assert "established" in repr(machine)


# --- properties ------------------------------------------------------------------


@each_case
@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=300), eof=st.booleans(), data=st.data())
def test_garbage_never_raises_foreign_exceptions(case, garbage, eof, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=20))
    garbage_run(case.start(), garbage, cuts, eof)
