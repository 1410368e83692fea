"""Proxy bytes and feeding helpers shared by the handshake tests."""

from relay.proto.errors import ProtocolError, ProxyRefused, RemoteProtocolError

PASSWORD = "s3cret-Pa55"

# Proxy replies, written out by hand from the specs (RFC 9110, SOCKS4, RFC 1928, RFC 1929).
OK_REPLY = b"HTTP/1.1 200 Connection established\r\n\r\n"
SOCKS4_GRANTED = b"\x00\x5a\x00\x00\x00\x00\x00\x00"
METHOD_NO_AUTH = b"\x05\x00"
METHOD_USER_PASS = b"\x05\x02"
AUTH_OK = b"\x01\x00"
REPLY_IPV4 = b"\x05\x00\x00\x01\xc0\x00\x02\x07\x1f\x90"  # bound 192.0.2.7:8080
REPLY_DOMAIN = b"\x05\x00\x00\x03\x0bexample.net\x00\x50"  # bound example.net:80
REPLY_IPV6 = b"\x05\x00\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x01\xbb"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets, without empty pieces (b"" means EOF)."""
    points = sorted(set(cuts))
    bounds = zip([0, *points], [*points, len(data)])
    return [data[start:end] for start, end in bounds if end > start]


def started(machine):
    """``machine`` once its first message went out, waiting for the proxy."""
    machine.data_to_send()
    return machine


def feed(machine, chunks: list[bytes]) -> None:
    for chunk in chunks:
        machine.receive_data(chunk)


def outcome(machine, chunks: list[bytes]):
    """How feeding ``chunks`` ends, comparable between two ways of splitting the same bytes."""
    try:
        feed(machine, chunks)
    except ProxyRefused as exc:
        return ("refused", exc.reason)
    except RemoteProtocolError:
        return ("malformed",)
    return ("done", machine.established, machine.trailing_data)


def garbage_run(machine, garbage: bytes, cuts: list[int], eof: bool) -> None:
    """Feed garbage; only relay.proto errors may escape, and state must stay coherent."""
    try:
        feed(machine, split_at(garbage, cuts) + ([b""] if eof else []))
    except ProtocolError:
        return
    # Whatever the machine keeps as tunnel data came from the end of the input.
    assert garbage.endswith(machine.trailing_data)
    if not machine.established:
        assert machine.trailing_data == b""


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text
    assert "Proxy-Authorization" not in text
    assert "YWxpY2U6" not in text  # start of base64("alice:...")
