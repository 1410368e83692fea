import pytest

from relay.net.early_data import probe_client_hello
from relay.proto.early_data import early_tls_records, tls_answer
from relay.proto.sniff import TLS, sniff

RECORD = b"\x16\x03\x01\x00\x03abc"
SECOND = b"\x16\x03\x03\x00\x01d"


@pytest.mark.parametrize(
    ("first", "early"),
    [
        (RECORD, RECORD),
        (RECORD + SECOND, RECORD + SECOND),  # a ClientHello in two records
        (RECORD + b"\x17\x03\x03\x00\x02xy", RECORD),  # 0-RTT application data stays for the tunnel
        (RECORD + b"\x14\x03\x03\x00\x01\x01", RECORD),  # so does a ChangeCipherSpec
        (RECORD + SECOND[:4], RECORD),  # an incomplete record stays too
        (RECORD[:-1], b""),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b""),  # not TLS: nothing goes early
        (b"\x16\x02\x00\x00\x01x", b""),  # not TLS 1.x
        (b"", b""),
    ],
)
def test_only_whole_leading_handshake_records_go_early(first, early):
    assert early_tls_records(first) == early


def test_the_probes_client_hello_is_one_the_sniffer_reads_with_its_name():
    hello = probe_client_hello("probe.relaylab.test")
    assert early_tls_records(hello) == hello
    assert sniff(hello).protocol == TLS and sniff(hello).hostname == "probe.relaylab.test"
    assert sniff(probe_client_hello("192.0.2.1")).hostname is None  # no SNI for an address


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (b"\x16\x03\x03\x00\x7a\x02", True),  # a ServerHello
        (b"\x15\x03\x03\x00\x02\x02\x28", True),  # an alert: the server read our bytes too
        (b"\x16", None),
        (b"\x16\x03", None),
        (b"", None),
        (b"HTTP/1.1 400 Bad Request\r\n", False),
        (b"SSH-2.0-OpenSSH\r\n", False),
        (b"\x17\x03\x03", False),
        (b"\x16\x05", False),
    ],
)
def test_what_counts_as_a_tls_servers_answer(answer, verdict):
    assert tls_answer(answer) is verdict
