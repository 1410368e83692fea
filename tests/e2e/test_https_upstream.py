"""https:// upstreams end to end: the relay speaks TLS to stunnel4 in front of stock squid on far (README's
far side), its certificate from a CA the test makes, checked against --upstream-ca."""

import os

import pytest

from relay.lab import ADDR, lab_certificates, start_squid, start_stunnel
from tests.e2e.clients import download, upload

BIG = 32 << 20
PROXY_NAME = "proxy.relay.lab"
STUNNEL_PORT = 8443  # stunnel in front of squid, anyone with TLS
MUTUAL_PORT = 8444  # stunnel that wants a client certificate
SQUID_PORT = 3138  # the plain squid behind both, on far's loopback only


@pytest.fixture(scope="module")
def tls_far(lab):
    """Certificates, a squid on far's loopback, and two stunnels in front of it."""
    certificates = lab_certificates(lab, PROXY_NAME, ADDR.far4, directory_name="tls-upstream")
    squid = start_squid(lab, listen=("127.0.0.1", SQUID_PORT), name="squid-behind-stunnel")
    plain = start_stunnel(lab, (ADDR.far4, STUNNEL_PORT), ("127.0.0.1", SQUID_PORT), certificates)
    mutual = start_stunnel(
        lab, (ADDR.far4, MUTUAL_PORT), ("127.0.0.1", SQUID_PORT), certificates, require_client_cert=True,
        name="stunnel-mutual",
    )  # fmt: skip
    yield certificates
    for service in (mutual, plain, squid):
        service.stop()


def https_args(certificates, port=STUNNEL_PORT, *extra):
    return [f"https://{ADDR.far4}:{port}", "--upstream-ca", str(certificates.ca), *extra]


def test_download_and_upload_arrive_intact_through_stunnel(run_relay, lab, tls_far):
    relay = run_relay(*https_args(tls_far))
    download(lab, BIG, seed=21)
    upload(lab, os.urandom(BIG))
    lines = relay.connections(at_least=2)
    assert [line["end"] for line in lines] == ["closed", "closed"]
    assert lines[0]["via"] == f"https://{ADDR.far4}:{STUNNEL_PORT}"
    assert int(lines[0]["down"]) >= BIG and int(lines[1]["up"]) >= BIG
