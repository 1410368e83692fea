"""The lab's far-link delay line (relay.lab.delayline): it delays, paces and passes ends on; and the
relay, with every round-trip saving on (pre-opened connections, pipelined SOCKS5, early data where
the proxy keeps it), moves bytes intact across it through each proxy: squid, privoxy and tinyproxy
(stock configurations) behind ssh -L, ssh -D, and dante."""

import hashlib
import os
import socket
import ssl
import time

import pytest
import trustme

from relay.lab import ADDR, sshd_across_delay_line, start_delay_line, start_privoxy, start_ssh_tunnel, start_tinyproxy
from relay.lab.delayline import MAX_HELD_BYTES
from relay.lab.servers import HttpServer, pattern_sha256
from tests.e2e.clients import download, read_all, receive_exactly, upload
from tests.e2e.conftest import TRAFFIC_PORT

ONE_WAY_MS = 50
RTT = 2 * ONE_WAY_MS / 1000
LINE_PORT = 7100  # on far, to the traffic server: the router reaches it, the server only far
SSH_LINE_PORT = 7101  # on the router's loopback, to far's sshd
DANTE_LINE_PORT = 7102  # on the router's loopback, to far's dante
DELAYED_SQUID = "127.0.0.1:3138"  # ssh -L across the line to squid on far
# The same ssh also forwards to privoxy and tinyproxy (Debian's configs: CONNECT to 443), and is a SOCKS5 proxy.
DELAYED = {
    "squid-via-ssh-L": DELAYED_SQUID,
    "privoxy-via-ssh-L": "127.0.0.1:8128",
    "tinyproxy-via-ssh-L": "127.0.0.1:8898",
    "ssh-D": "socks5://127.0.0.1:1091",
    "dante": f"socks5://127.0.0.1:{DANTE_LINE_PORT}",
}


@pytest.fixture(scope="module")
def direct_line(lab):
    line = start_delay_line(
        lab, (ADDR.far4, LINE_PORT), (ADDR.server4, TRAFFIC_PORT), ONE_WAY_MS, host="far", name="delay-direct"
    )
    yield line
    line.stop()


@pytest.fixture(scope="module")
def far_link(lab):
    """ssh -L and the dante port on the router, both reached across a 100 ms round trip."""
    delayed_sshd, ssh_line = sshd_across_delay_line(lab, lab.sshd, SSH_LINE_PORT, ONE_WAY_MS)
    lines = [
        ssh_line,
        start_delay_line(lab, ("127.0.0.1", DANTE_LINE_PORT), (ADDR.far4, 1080), ONE_WAY_MS, name="delay-dante"),
    ]
    proxies = [start_privoxy(lab, name="privoxy-delayed"), start_tinyproxy(lab, name="tinyproxy-delayed")]
    forwards = ["-D", DELAYED["ssh-D"].removeprefix("socks5://")]
    for local, far_port in (
        (DELAYED_SQUID, 3128),
        (DELAYED["privoxy-via-ssh-L"], 8118),
        (DELAYED["tinyproxy-via-ssh-L"], 8888),
    ):
        forwards += ["-L", f"{local}:127.0.0.1:{far_port}"]
    tunnel = start_ssh_tunnel(lab, delayed_sshd, forwards=forwards, wait=("127.0.0.1", 3138), name="ssh-delayed")
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(ADDR.server4).configure_cert(tls)
    lab.delayed_ca = str(lab.tmpdir / "delayed-ca.pem")
    ca.cert_pem.write_to_path(lab.delayed_ca)
    https = HttpServer(lab, "server", "0.0.0.0", 443, tls=tls)
    yield
    https.close()
    for service in (tunnel, *proxies, *lines):
        service.stop()


def line_connect(lab):
    return lab.connect("router", ADDR.far4, LINE_PORT, timeout=30)


def test_a_round_trip_across_the_line_takes_twice_its_delay(lab, direct_line):
    started = time.monotonic()
    with line_connect(lab) as sock:
        sock.sendall(b"ECHO\n!")
        assert receive_exactly(sock, 1) == b"!"
        # The connect's round trip (which the line plays, having accepted at once), then the echo's.
        assert time.monotonic() - started >= 2 * RTT
        for size in (1, 1000, 100_000):
            data = os.urandom(size)
            started = time.monotonic()
            sock.sendall(data)
            assert receive_exactly(sock, size) == data
            assert time.monotonic() - started >= RTT


def test_a_round_trip_across_the_line_takes_no_more_than_its_delay(lab, direct_line):
    """The delay is what was asked for, not more: the best of a few echoes (a busy machine may
    stall any one) is within a few milliseconds of the round trip."""
    with line_connect(lab) as sock:
        sock.sendall(b"ECHO\n!")
        assert receive_exactly(sock, 1) == b"!"
        times = []
        for _ in range(5):
            started = time.monotonic()
            sock.sendall(b"x")
            assert receive_exactly(sock, 1) == b"x"
            times.append(time.monotonic() - started)
    assert RTT <= min(times) <= RTT + 0.01


def test_a_reader_that_stalls_gets_every_byte(lab, direct_line):
    """More than the line holds for one direction (MAX_HELD_BYTES): it stops reading, its pipes fill
    and its writes find the client's buffer full; then it catches up, in order."""
    size = MAX_HELD_BYTES + (24 << 20)
    with line_connect(lab) as sock:
        sock.sendall(f"DOWN {size} 9\n".encode())
        time.sleep(1.5)
        assert read_all(sock) == (size, pattern_sha256(size, 9))


def test_bytes_and_half_close_pass_intact(lab, direct_line):
    size = 8 << 20
    with line_connect(lab) as sock:
        sock.sendall(f"DOWN {size} 7\n".encode())
        assert read_all(sock) == (size, pattern_sha256(size, 7))
    data = os.urandom(3 << 20)
    with line_connect(lab) as sock:
        # The server answers only after the client's FIN crossed the line.
        sock.sendall(b"UPEOF\n" + data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100).strip().decode() == hashlib.sha256(data).hexdigest()


def test_a_rate_cap_paces_the_link(lab):
    size, mbit = 2 << 20, 40
    line = start_delay_line(
        lab,
        (ADDR.far4, LINE_PORT + 10),
        (ADDR.server4, TRAFFIC_PORT),
        1,
        host="far",
        rate_mbit=mbit,
        name="delay-capped",
    )
    try:
        with lab.connect("router", ADDR.far4, LINE_PORT + 10, timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(f"DOWN {size} 3\n".encode())
            assert read_all(sock) == (size, pattern_sha256(size, 3))
            # A floor, not a speed figure: the line may not hand over bytes faster than its rate.
            assert time.monotonic() - started >= 0.9 * size * 8 / (mbit * 1e6)
    finally:
        line.stop()


@pytest.mark.parametrize("upstream", [DELAYED_SQUID, DELAYED["dante"]], ids=["squid-via-ssh-L", "dante"])
def test_relay_across_the_far_link_is_byte_exact(lab, far_link, run_relay, upstream):
    run_relay(upstream)
    download(lab, 16 << 20, seed=5)
    upload(lab, os.urandom(4 << 20))
    with lab.connect("client", ADDR.server4, TRAFFIC_PORT, timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"ECHO\nx")
        assert receive_exactly(sock, 1) == b"x"
        # The proxy's handshake and the echo each crossed the far link.
        assert time.monotonic() - started >= 2 * RTT


@pytest.mark.parametrize("proxy", DELAYED)
def test_https_through_each_proxy_across_the_far_link_is_byte_exact_both_ways(lab, far_link, run_relay, proxy):
    """HTTPS (the ClientHello is what early data carries) to the server by address, which every stock proxy allows."""
    run_relay(DELAYED[proxy])
    size, seed = 3 << 20, 8
    body = os.urandom(1 << 20)
    upload_file = lab.tmpdir / f"upload-{proxy}.bin"
    upload_file.write_bytes(body)
    for _ in range(2):  # the second connection finds one opened ahead
        url = f"https://{ADDR.server4}"
        result = lab.run(
            "client",
            [
                *("curl", "-sS", "--max-time", "60", "--cacert", lab.delayed_ca),
                *(f"{url}/blob/{size}/{seed}", "-o", str(lab.tmpdir / "blob")),
                *("--next", "--cacert", lab.delayed_ca, "-T", str(upload_file), f"{url}/sha256"),
            ],
            check=False,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((lab.tmpdir / "blob").read_bytes()).hexdigest() == pattern_sha256(size, seed)
        assert result.stdout.strip() == hashlib.sha256(body).hexdigest()
