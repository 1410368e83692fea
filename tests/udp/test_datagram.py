"""The SOCKS5 UDP request header (relay.udp.datagram): what goes to the proxy, and what comes back whole,
cut short at every byte, or malformed."""

import pytest

from relay.udp.datagram import BadDatagram, decode, encode, header


@pytest.mark.parametrize(
    "host,port,expected",
    [
        ("10.77.3.2", 7100, b"\0\0\0\x01\x0a\x4d\x03\x02\x1b\xbc"),
        ("fd77:3::2", 53, b"\0\0\0\x04" + bytes.fromhex("fd770003000000000000000000000002") + b"\0\x35"),
    ],
)
def test_a_header_names_the_destination_by_address(host, port, expected):
    assert header(host, port) == expected
    assert encode(host, port, b"payload") == expected + b"payload"
    assert decode(expected + b"payload") == (host, port, b"payload")


@pytest.mark.parametrize("payload", [b"", b"\0", bytes(range(256)) * 40])
def test_decoding_gives_back_the_payload_byte_exact(payload):
    assert decode(encode("192.0.2.1", 443, payload)) == ("192.0.2.1", 443, payload)


@pytest.mark.parametrize("host", ["10.0.0.1", "2001:db8::1"])
def test_every_datagram_cut_inside_its_header_is_malformed(host):
    whole = header(host, 9)
    for size in range(len(whole)):
        with pytest.raises(BadDatagram) as caught:
            decode(whole[:size])
        assert caught.value.reason == "malformed"
    assert decode(whole) == (host, 9, b"")  # an empty payload is a datagram all the same


@pytest.mark.parametrize(
    "datagram,reason,words",
    [
        (b"\0\x01\0\x01" + bytes(6), "malformed", "reserved"),
        (b"\x01\0\0\x01" + bytes(6), "malformed", "reserved"),
        (b"\0\0\x01\x01\x0a\0\0\x01\0\x35data", "fragment", "fragment"),
        (b"\0\0\x81\x01\x0a\0\0\x01\0\x35data", "fragment", "fragment"),
        (b"\0\0\0\x03\x07example\0\x35data", "malformed", "domain name"),
        (b"\0\0\0\x02" + bytes(8), "malformed", "address type 2"),
        (b"\0\0\0\x01\x0a\0\0\x01\0\0data", "malformed", "port 0"),
    ],
)
def test_malformed_headers_and_fragments_are_refused_with_a_reason(datagram, reason, words):
    with pytest.raises(BadDatagram, match=words) as caught:
        decode(datagram)
    assert caught.value.reason == reason


@pytest.mark.parametrize("host,port", [("example.com", 80), ("10.0.0.1", 0), ("10.0.0.1", 65536)])
def test_a_header_needs_an_address_and_a_port(host, port):
    with pytest.raises(ValueError):
        header(host, port)
