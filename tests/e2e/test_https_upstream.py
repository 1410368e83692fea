"""https:// upstreams end to end: the relay speaks TLS to stunnel4 in front of stock squid on far, or to
Debian's squid itself (https_port): README's two far sides. Certificates from CAs the test makes, checked
against --upstream-ca."""

import datetime
import os
import shutil
import ssl
import threading
import time

import pytest

from relay.lab import ADDR, lab_certificates, start_delay_line, start_squid, start_stunnel
from relay.lab.servers import HttpServer, serve_https
from tests.e2e.clients import connect_expecting_reset, download, get_hello, upload
from tests.e2e.test_dns_service import DNS, dig
from tests.e2e.test_preconnect import METRICS_PORT, counters, failed_attempts

BIG = 32 << 20
PROXY_NAME = "proxy.relay.lab"
STUNNEL_PORT = 8443  # stunnel in front of squid, anyone with TLS
MUTUAL_PORT = 8444  # stunnel that wants a client certificate
SQUID_PORT = 3138  # the plain squid behind both, on far's loopback only
EXPIRED_PORT = 8445  # stunnel with a certificate that expired yesterday
STALLING_PORT = 8446  # accepts, never answers the ClientHello
GARBAGE_PORT = 8447  # answers with bytes that are not TLS
SQUID_HTTPS_PORT = 8448  # squid's own https_port


@pytest.fixture(scope="module")
def tls_far(lab):
    """Certificates, a squid on far's loopback, and two stunnels in front of it."""
    certificates = lab_certificates(lab, PROXY_NAME, ADDR.far4, directory_name="tls-upstream")
    squid = start_squid(lab, listen=("127.0.0.1", SQUID_PORT), name="squid-behind-stunnel")
    shutil.chown(certificates.key, "proxy")  # squid reads it after dropping to "proxy"
    https_port = f"https_port {ADDR.far4}:{SQUID_HTTPS_PORT} tls-cert={certificates.chain} tls-key={certificates.key}"
    squid_https = start_squid(lab, listen=("127.0.0.1", SQUID_PORT + 1), name="squid-https", extra=[https_port])
    plain = start_stunnel(lab, (ADDR.far4, STUNNEL_PORT), ("127.0.0.1", SQUID_PORT), certificates)
    mutual = start_stunnel(
        lab, (ADDR.far4, MUTUAL_PORT), ("127.0.0.1", SQUID_PORT), certificates, require_client_cert=True,
        name="stunnel-mutual",
    )  # fmt: skip
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = lab_certificates(
        lab, PROXY_NAME, ADDR.far4, directory_name="tls-expired", not_before=yesterday - datetime.timedelta(days=30),
        not_after=yesterday,
    )  # fmt: skip
    late = start_stunnel(lab, (ADDR.far4, EXPIRED_PORT), ("127.0.0.1", SQUID_PORT), expired, name="stunnel-expired")
    certificates.expired_ca = expired.ca
    stalling = lab.socket("far")
    stalling.bind((ADDR.far4, STALLING_PORT))
    stalling.listen(16)  # the kernel completes the TCP handshakes; no one reads
    garbage = lab.socket("far")
    garbage.bind((ADDR.far4, GARBAGE_PORT))
    garbage.listen(16)
    threading.Thread(target=answer_garbage, args=(garbage,), daemon=True).start()
    yield certificates
    for service in (late, mutual, plain, squid, squid_https):
        service.stop()


def answer_garbage(listener):
    """What a plain HTTP server says to a ClientHello, then a close."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the lab closed it
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + os.urandom(64))


def https_args(certificates, port=STUNNEL_PORT, *extra):
    return [f"https://{ADDR.far4}:{port}", "--upstream-ca", str(certificates.ca), *extra]


@pytest.mark.parametrize("port", [STUNNEL_PORT, SQUID_HTTPS_PORT], ids=["stunnel-squid", "squid-https_port"])
def test_download_and_upload_arrive_intact(run_relay, lab, tls_far, port):
    relay = run_relay(*https_args(tls_far, port))
    download(lab, BIG, seed=21)
    upload(lab, os.urandom(BIG))
    lines = relay.connections(at_least=2)
    assert [line["end"] for line in lines] == ["closed", "closed"]
    assert lines[0]["via"] == f"https://{ADDR.far4}:{port}"
    assert int(lines[0]["down"]) >= BIG and int(lines[1]["up"]) >= BIG


def refused(relay, reason):
    """The connection's log line says it was refused for ``reason``, the proxy's fault."""
    line = relay.connections(at_least=1)[-1]
    assert line["end"] == f"refused:{reason}", line
    assert line["fault"] == "proxy", line
    return line


def test_mutual_tls_with_a_client_certificate(run_relay, lab, tls_far):
    cert = ["--upstream-cert", str(tls_far.client_cert), "--upstream-key", str(tls_far.client_key)]
    relay = run_relay(*https_args(tls_far, MUTUAL_PORT, *cert))
    download(lab, 4 << 20, seed=22)
    assert relay.connections(at_least=1)[0]["end"] == "closed"


def test_mutual_tls_without_a_client_certificate_is_refused(run_relay, lab, tls_far):
    relay = run_relay(*https_args(tls_far, MUTUAL_PORT))
    connect_expecting_reset(lab, "client", ADDR.server4, 7000, within=5)
    line = refused(relay, "tls-alert")
    assert "alert" in line["error"]


def test_the_name_in_the_certificate_can_be_given_as_sni(run_relay, lab, tls_far):
    relay = run_relay(*https_args(tls_far, STUNNEL_PORT, "--upstream-sni", PROXY_NAME))
    download(lab, 1 << 20, seed=23)
    assert relay.connections(at_least=1)[0]["end"] == "closed"


@pytest.mark.parametrize(
    "case,why",
    [
        ("unknown-ca", "unable to get local issuer certificate"),
        ("wrong-name", "Hostname mismatch"),
        ("expired", "certificate has expired"),
    ],
)
def test_a_certificate_that_fails_the_check_is_refused_at_once_and_marks_the_proxy_unhealthy(
    run_relay, lab, tls_far, case, why
):
    ca, port, extra = tls_far.ca, STUNNEL_PORT, []
    if case == "unknown-ca":
        ca = tls_far.client_ca  # a CA that signed nothing the proxy shows
    elif case == "wrong-name":
        extra = ["--upstream-sni", "other.relay.lab"]
    else:
        ca, port = tls_far.expired_ca, EXPIRED_PORT
    relay = run_relay(f"https://{ADDR.far4}:{port}", "--upstream-ca", str(ca), *extra)
    started = time.monotonic()
    connect_expecting_reset(lab, "client", ADDR.server4, 7000, within=5)
    assert time.monotonic() - started < 2  # at once: no timeout waited for
    line = refused(relay, "tls-certificate")
    assert why in line["error"]
    # One failure is enough: it will not go away by itself. The line says why.
    assert relay.wait_for_log("is unhealthy")
    warning = next(text for text in relay.log_text().splitlines() if "is unhealthy" in text)
    assert why in warning and f"https://{ADDR.far4}:{port}" in warning


def test_a_proxy_that_stalls_mid_handshake_times_out(run_relay, lab, tls_far):
    relay = run_relay(
        f"https://{ADDR.far4}:{STALLING_PORT}", "--upstream-ca", str(tls_far.ca), "--handshake-timeout", "1"
    )
    started = time.monotonic()
    connect_expecting_reset(lab, "client", ADDR.server4, 7000, within=5)
    assert 0.9 < time.monotonic() - started < 3
    refused(relay, "handshake-timeout")


def test_garbage_instead_of_tls_is_refused_clearly(run_relay, lab, tls_far):
    relay = run_relay(f"https://{ADDR.far4}:{GARBAGE_PORT}", "--upstream-ca", str(tls_far.ca))
    connect_expecting_reset(lab, "client", ADDR.server4, 7000, within=5)
    line = refused(relay, "tls-not-tls")
    assert "does not speak TLS" in line["error"]


LINE_PORT = 7311  # the router's end of a delay line to the stunnel
ONE_WAY_MS = 50


def timed_download(lab, size, seed):
    started = time.monotonic()
    download(lab, size, seed=seed)
    return time.monotonic() - started


def test_pre_opened_connections_save_the_tls_handshake_too(run_relay, lab, tls_far, figures):
    """Across a 100 ms round trip: a client that gets a pre-opened connection skips the TCP connect's and the
    TLS handshake's round trips (about 4 round trips without it, 2 with it)."""
    line = start_delay_line(lab, ("127.0.0.1", LINE_PORT), (ADDR.far4, STUNNEL_PORT), ONE_WAY_MS, name="delay-tls")
    try:
        https = [f"https://127.0.0.1:{LINE_PORT}", "--upstream-ca", str(tls_far.ca), "--upstream-sni", PROXY_NAME]
        metrics = ["--metrics", f"127.0.0.1:{METRICS_PORT}"]
        cold_relay = run_relay(*https, "--preconnect", "off")
        cold = min(timed_download(lab, 10_000, seed) for seed in range(3))
        cold_relay.stop()
        relay = run_relay(*https, "--preconnect", "2", *metrics)
        timed_download(lab, 10_000, 0)  # the first fills the pool
        warm = []
        for seed in range(1, 4):
            time.sleep(1.0)  # refilled, handshakes done
            warm.append(timed_download(lab, 10_000, seed))
        round_trip = 2 * ONE_WAY_MS / 1000
        figures("10 kB download at 100 ms RTT, s (fresh / pre-opened)", f"{cold:.3f} / {min(warm):.3f}")
        assert min(warm) < cold - 1.5 * round_trip, (cold, warm)
        found = counters(lab)
        assert found.get('relay_preconnect_total{outcome="taken"}', 0) >= 3, found
        assert failed_attempts(found) == 0
        assert [line["end"] for line in relay.connections(at_least=4)] == ["closed"] * 4
    finally:
        line.stop()


HTTP_PORT = 8082


def test_plain_http_is_forwarded_in_absolute_form_inside_tls_and_its_connection_reused(run_relay, lab, tls_far):
    """Keep-alive clients one after another: each request goes in absolute form inside TLS, the later ones
    on the TLS connection to the proxy an earlier client left."""
    server = HttpServer(lab, "server", "0.0.0.0", HTTP_PORT)
    try:
        relay = run_relay(*https_args(tls_far), "--preconnect", "off", "--metrics", f"127.0.0.1:{METRICS_PORT}")
        request = f"GET /hello HTTP/1.1\r\nHost: {ADDR.server4}:{HTTP_PORT}\r\n\r\n".encode()
        for _ in range(3):
            get_hello(lab, HTTP_PORT, request)
            time.sleep(0.2)  # the relay takes the proxy connection back
        lines = relay.connections(at_least=3)
        assert [(line["http-requests"], line["via"]) for line in lines] == [
            ("1", f"https://{ADDR.far4}:{STUNNEL_PORT}")
        ] * 3
        assert counters(lab).get('relay_preconnect_total{outcome="reused"}', 0) >= 2
    finally:
        server.close()


TLS12_PORT = 8449
RESTARTING_PORT = 8450


def test_a_tls_1_2_proxy_works(run_relay, lab, tls_far):
    stunnel = start_stunnel(
        lab, (ADDR.far4, TLS12_PORT), ("127.0.0.1", SQUID_PORT), tls_far, name="stunnel-tls12",
        extra=["sslVersionMax = TLSv1.2"],
    )  # fmt: skip
    try:
        relay = run_relay(*https_args(tls_far, TLS12_PORT))
        download(lab, 8 << 20, seed=31)
        upload(lab, os.urandom(8 << 20))
        assert [line["end"] for line in relay.connections(at_least=2)] == ["closed", "closed"]
    finally:
        stunnel.stop()


def test_the_proxy_restarting_under_50_downloads_truncates_none_and_is_used_again(run_relay, lab, tls_far):
    """stunnel killed (its connections end with FINs, no close_notify) while 50 downloads run: with
    --confirm-eof each ends intact or reset, never short with a clean end; once it is back, it is used."""
    stunnel = start_stunnel(
        lab, (ADDR.far4, RESTARTING_PORT), ("127.0.0.1", SQUID_PORT), tls_far, name="stunnel-restart"
    )
    try:
        relay = run_relay(*https_args(tls_far, RESTARTING_PORT), "--confirm-eof", "on", "--health-interval", "1")
        outcomes = []

        def one(seed):
            try:
                download(lab, 8 << 20, seed=seed)
                outcomes.append("intact")
            except ConnectionResetError:
                outcomes.append("reset")
            except AssertionError:
                outcomes.append("truncated")  # the sha256 or the size did not match: a clean end of a cut stream
            except OSError as exc:
                outcomes.append(repr(exc))

        threads = [threading.Thread(target=one, args=(seed,)) for seed in range(50)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        stunnel.kill()
        time.sleep(2)
        stunnel.start()
        for thread in threads:
            thread.join(120)
        assert len(outcomes) == 50 and set(outcomes) <= {"intact", "reset"}, outcomes
        assert "reset" in outcomes  # the kill did cut some
        deadline = time.monotonic() + 10
        while True:
            try:
                download(lab, 1 << 20, seed=99)
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, relay.log_text()[-2000:]
                time.sleep(0.5)
    finally:
        stunnel.stop()


@pytest.mark.parametrize("scheme", ["https", "tcp"])
def test_the_dns_service_resolves_through_an_https_upstream(relays, lab, tls_far, unbound, scheme):
    """DoH (TLS inside the proxy's TLS) and DNS over TCP, through the tunnel, answered by the far side."""
    dns_upstream = unbound.doh_url if scheme == "https" else f"tcp://{unbound.address}:53"
    relays.start(
        ["--upstream", *https_args(tls_far), "--dns", DNS, "--dns-upstream", dns_upstream,
         "--dns-ca", str(unbound.ca_file)]
    )  # fmt: skip
    assert dig(lab, "far-only.example", "A") == ("NOERROR", [ADDR.server4])
    assert dig(lab, "+tcp", "far-only.example", "AAAA") == ("NOERROR", [ADDR.server6])
    assert dig(lab, "+tcp", "nowhere.example", "A") == ("NXDOMAIN", [])


HTTPS_TARGET_PORT = 4443


def test_early_data_auto_finds_the_proxy_behind_tls_keeps_it_and_sends_it(run_relay, lab, tls_far):
    """The --early-data auto probe through TLS to stunnel and squid; then a TLS client's ClientHello goes
    with the CONNECT, inside the proxy's TLS."""
    ca = serve_https(lab, ADDR.server4, ca_file="https-target-ca.pem", port=HTTPS_TARGET_PORT)
    target = f"{ADDR.server4}:{HTTPS_TARGET_PORT}"
    relay = run_relay(*https_args(tls_far), "--health-target", target)
    assert relay.wait_for_log(f"keeps early data sent after CONNECT (a ClientHello to {target})", timeout=15), (
        relay.log_text()
    )
    context = ssl.create_default_context(cafile=ca)
    raw = lab.connect("client", ADDR.server4, HTTPS_TARGET_PORT, timeout=10)
    with context.wrap_socket(raw, server_hostname=ADDR.server4) as sock:
        sock.sendall(f"GET /hello HTTP/1.1\r\nHost: {ADDR.server4}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello from the lab server\n")
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and int(line["early-data"]) > 200
