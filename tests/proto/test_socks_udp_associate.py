"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7), the client side: the request, the relay address in the reply, fed
whole, byte by byte, refused, malformed or cut short."""

import pytest

from relay.proto.errors import ProxyRefused, RemoteProtocolError
from relay.proto.socks import Socks5UdpAssociate
from tests.proto.support import AUTH_OK, METHOD_NO_AUTH, METHOD_USER_PASS, PASSWORD, assert_no_secret, feed

UNSPECIFIED_REPLY = b"\x05\x00\x00\x01\0\0\0\0\x04\x38"  # bound 0.0.0.0:1080: the proxy's own address
ASSOCIATE_REQUEST = b"\x05\x03\x00\x01\0\0\0\0\0\0"  # from 0.0.0.0:0: not known (RFC 1928: all zeros)


def test_the_request_names_udp_associate_from_all_zeros_after_the_greeting():
    machine = Socks5UdpAssociate()
    assert machine.data_to_send() == b"\x05\x01\x00"
    machine.receive_data(METHOD_NO_AUTH)
    assert machine.data_to_send() == ASSOCIATE_REQUEST


def test_with_credentials_the_request_follows_the_authentication():
    machine = Socks5UdpAssociate("alice", PASSWORD)
    assert machine.data_to_send() == b"\x05\x02\x00\x02"
    machine.receive_data(METHOD_USER_PASS)
    assert machine.data_to_send() == b"\x01\x05alice" + bytes([len(PASSWORD)]) + PASSWORD.encode()
    machine.receive_data(AUTH_OK)
    assert machine.data_to_send() == ASSOCIATE_REQUEST
    assert_no_secret(repr(machine))


@pytest.mark.parametrize(
    "reply,bound",
    [
        (UNSPECIFIED_REPLY, ("0.0.0.0", 1080)),
        (b"\x05\x00\x00\x01\x0a\x4d\x02\x02\xc3\x50", ("10.77.2.2", 50000)),
        (b"\x05\x00\x00\x04" + bytes.fromhex("fd770002000000000000000000000002") + b"\xc3\x50", ("fd77:2::2", 50000)),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_the_relay_address_comes_from_the_reply_whole_or_byte_by_byte(reply, bound, bytewise):
    machine = Socks5UdpAssociate()
    machine.data_to_send()
    data = METHOD_NO_AUTH + reply
    feed(machine, [data[i : i + 1] for i in range(len(data))] if bytewise else [data])
    assert machine.established and machine.bound_address == bound and machine.trailing_data == b""


@pytest.mark.parametrize("code,reason", [(7, "socks5-command-not-supported"), (2, "socks5-not-allowed")])
def test_a_refusal_says_udp_associate(code, reason):
    machine = Socks5UdpAssociate()
    machine.data_to_send()
    with pytest.raises(ProxyRefused, match="refused UDP ASSOCIATE") as caught:
        feed(machine, [METHOD_NO_AUTH, bytes([5, code, 0, 1]) + bytes(6)])
    assert caught.value.reason == reason


@pytest.mark.parametrize("cut", range(len(METHOD_NO_AUTH + UNSPECIFIED_REPLY)))
def test_a_proxy_closing_before_the_whole_reply_is_an_error(cut):
    machine = Socks5UdpAssociate()
    machine.data_to_send()
    data = (METHOD_NO_AUTH + UNSPECIFIED_REPLY)[:cut]
    with pytest.raises(RemoteProtocolError, match="closed|UDP ASSOCIATE"):
        feed(machine, ([data] if data else []) + [b""])


@pytest.mark.parametrize("reply", [b"\x04\x00\x00\x01" + bytes(6), b"\x05\x00\x00\x09" + bytes(6)])
def test_a_malformed_reply_is_an_error(reply):
    machine = Socks5UdpAssociate()
    machine.data_to_send()
    with pytest.raises(RemoteProtocolError):
        feed(machine, [METHOD_NO_AUTH, reply])


def test_pipelined_the_greeting_and_the_request_go_out_at_once():
    machine = Socks5UdpAssociate(pipelined=True)
    assert machine.data_to_send() == b"\x05\x01\x00" + ASSOCIATE_REQUEST
    assert machine.pipelining_unconfirmed
    machine.receive_data(METHOD_NO_AUTH + UNSPECIFIED_REPLY)
    assert machine.established and machine.bound_address == ("0.0.0.0", 1080)
    assert machine.data_to_send() == b""


def test_pipelined_with_credentials_only_username_password_is_offered():
    machine = Socks5UdpAssociate("alice", PASSWORD, pipelined=True)
    auth = b"\x01\x05alice" + bytes([len(PASSWORD)]) + PASSWORD.encode()
    assert machine.data_to_send() == b"\x05\x01\x02" + auth + ASSOCIATE_REQUEST
    for byte in METHOD_USER_PASS + AUTH_OK + UNSPECIFIED_REPLY:  # the replies still checked one by one
        machine.receive_data(bytes([byte]))
    assert machine.established
    assert_no_secret(repr(machine))


def test_pipelined_a_refusal_after_the_greeting_is_not_blamed_on_pipelining():
    machine = Socks5UdpAssociate(pipelined=True)
    machine.data_to_send()
    machine.receive_data(METHOD_NO_AUTH)
    with pytest.raises(ProxyRefused):
        machine.receive_data(b"\x05\x07\x00\x01" + bytes(6))  # command not supported
    assert not machine.pipelining_unconfirmed
