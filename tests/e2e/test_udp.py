"""UDP over TPROXY through dante's UDP ASSOCIATE (issue 17): the rules `relay rules --apply` installs on the
router (nft and iptables), a relay with --udp on, Python UDP clients on the client host, a UDP echo server on
the server host that only dante (on far) can reach."""

import json
import os
import re
import socket
import sys
import time

import pytest

from relay.lab import ADDR, start_dante
from relay.lab.servers import UdpEchoServer
from tests.e2e.clients import download
from tests.e2e.conftest import RELAY_PORT, UPSTREAMS

ECHO_PORT = 7100
MARK = "0x10"
NO_UDP_DANTE_PORT = 1083
REPLY_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def echo(lab):
    server = UdpEchoServer(lab, "server", "::", ECHO_PORT)
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def dante_without_udp(lab):
    dante = start_dante(lab, listen=[(ADDR.far4, NO_UDP_DANTE_PORT)], deny_udp=True, name="dante-no-udp")
    yield f"socks5://{ADDR.far4}:{NO_UDP_DANTE_PORT}"
    dante.stop()


def relay_args(upstream: str, *extra: str) -> list[str]:
    return [
        "--upstream",
        upstream,
        "--mode",
        "tproxy",
        "--mark",
        MARK,
        "--udp",
        "on",
        "--lan-iface",
        ADDR.router_lan_if,
        "--listen",
        f"0.0.0.0:{RELAY_PORT}",
        "--listen",
        f"[::]:{RELAY_PORT}",
        "--udp-idle-timeout",
        "2",  # sessions end before the settle check after each case (the last value given wins)
        *extra,
    ]


class Rules:
    """`relay rules --apply` on the router with the relay's own options; removed when the test ends."""

    def __init__(self, lab):
        self.lab = lab
        self.applied = []

    def apply(self, args: list[str], backend: str) -> None:
        command = [sys.executable, "-m", "relay", "rules", "--backend", backend, "--keep-private", *args]
        self.lab.run("router", [*command, "--apply"])
        self.applied.append([*command, "--remove"])

    def remove(self) -> None:
        for command in self.applied:
            self.lab.run("router", command)


@pytest.fixture
def rules(lab):
    installed = Rules(lab)
    yield installed
    installed.remove()


@pytest.fixture
def udp_relay(relays, rules, echo):
    """start(upstream, *extra, backend=...): the relay and its rules, both with --udp on."""

    def start(upstream=UPSTREAMS["dante"], *extra, backend="nft", pure=False):
        args = relay_args(upstream, *extra)
        relay = relays.start(args, pure=pure)
        rules.apply(args, backend)
        return relay

    return start


def client_socket(lab, family=socket.AF_INET) -> socket.socket:
    sock = lab.socket("client", family, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def round_trip(sock, payload: bytes, address=(ADDR.server4, ECHO_PORT)) -> tuple[bytes, tuple]:
    sock.sendto(payload, address)
    reply, source = sock.recvfrom(1 << 16)
    return reply, source[:2]


def session_lines(relay, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        text = relay.log_text().splitlines()
        lines = [dict(re.findall(r"([\w-]+)=(\S+)", line)) for line in text if " relay: udp " in line]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("backend", "pure"), [("nft", False), ("iptables", False), ("nft", True)], ids=["nft", "iptables", "pure-python"]
)
def test_datagrams_come_back_byte_exact_from_the_address_the_client_asked(lab, udp_relay, echo, backend, pure):
    relay = udp_relay(backend=backend, pure=pure)
    assert ("forced by RELAY_NO_EXTENSIONS" in relay.log_text()) == pure
    sock = client_socket(lab)
    payloads = [b"x", bytes(range(256)) * 2, b"\0" * 1472, bytes(range(251)) * 32]  # up to 8032: IP fragments
    for payload in payloads:
        reply, source = round_trip(sock, payload)
        assert reply == payload
        assert source == (ADDR.server4, ECHO_PORT)  # from the destination, not from the relay
    # The echo server saw dante's server-side address: the datagrams went through the proxy.
    assert {peer[0].removeprefix("::ffff:") for peer in echo.peers[-len(payloads) :]} == {ADDR.far_server_side4}
    # The association was the relay's only dial: Debian's dante takes it pipelined.
    assert relay.wait_for_log("took a pipelined SOCKS5 handshake")


def test_a_client_port_keeps_one_session_for_several_remotes_and_two_clients_get_their_own(lab, udp_relay, echo):
    relay = udp_relay("socks5://" + f"{ADDR.far4}:1080", "--udp-idle-timeout", "1")
    first, second = client_socket(lab), client_socket(lab)
    for round_number in range(3):
        for number, sock in enumerate((first, second)):
            payload = f"client {number} round {round_number}".encode()
            assert round_trip(sock, payload) == (payload, (ADDR.server4, ECHO_PORT))
    # The same client port, another remote port on the server: the same session (endpoint-independent).
    second_echo = UdpEchoServer(lab, "server", "::", ECHO_PORT + 1)
    try:
        assert round_trip(first, b"other port", (ADDR.server4, ECHO_PORT + 1)) == (
            b"other port",
            (ADDR.server4, ECHO_PORT + 1),
        )
        lines = session_lines(relay, at_least=2)
    finally:
        second_echo.sock.close()
    assert len(lines) == 2
    by_client = {line["client"]: line for line in lines}
    first_line = by_client[f"{ADDR.client4}:{first.getsockname()[1]}"]
    assert first_line["end"] == "idle" and first_line["datagrams-up"] == "4" and first_line["remotes"] == "2"
    assert by_client[f"{ADDR.client4}:{second.getsockname()[1]}"]["datagrams-down"] == "3"


def test_an_idle_session_ends_and_the_next_datagram_opens_another(lab, udp_relay):
    relay = udp_relay(UPSTREAMS["dante"], "--udp-idle-timeout", "1")
    sock = client_socket(lab)
    assert round_trip(sock, b"before")[0] == b"before"
    started = time.monotonic()
    [line] = session_lines(relay, at_least=1)
    assert line["end"] == "idle" and 0.9 < time.monotonic() - started < 4
    assert round_trip(sock, b"after")[0] == b"after"
    assert len(session_lines(relay, at_least=2)) == 2


def test_a_session_busy_past_its_idle_timeout_is_not_ended(lab, udp_relay):
    """Its datagrams go through the engine, which Python hears of only at each sweep: still not idle."""
    relay = udp_relay(UPSTREAMS["dante"], "--udp-idle-timeout", "1")
    sock = client_socket(lab)
    for number in range(12):  # 2.4 s of a round trip every 0.2 s
        assert round_trip(sock, b"busy %d" % number)[0] == b"busy %d" % number
        time.sleep(0.2)
    assert session_lines(relay, timeout=0) == []
    [line] = session_lines(relay, at_least=1)
    assert line["end"] == "idle" and line["datagrams-up"] == "12" and line["datagrams-down"] == "12"


def test_sessions_past_the_per_source_cap_are_dropped_and_the_others_go_on(lab, udp_relay):
    relay = udp_relay(UPSTREAMS["dante"], "--udp-max-per-source", "4", "--udp-idle-timeout", "3")
    sockets = [client_socket(lab) for _ in range(7)]
    for sock in sockets:
        sock.sendto(b"hello", (ADDR.server4, ECHO_PORT))
    answered = 0
    for sock in sockets:
        sock.settimeout(1.0)
        try:
            answered += sock.recv(100) == b"hello"
        except TimeoutError:
            pass
    assert answered == 4
    assert relay.wait_for_log("UDP: no session for a new client (source-full)")
    assert len(session_lines(relay, at_least=4, timeout=8)) == 4


def test_a_proxy_refusing_udp_associate_fails_the_session_in_one_line_and_tcp_goes_on(
    lab, udp_relay, dante_without_udp
):
    relay = udp_relay(dante_without_udp)
    sock = client_socket(lab)
    sock.settimeout(1.0)
    for _ in range(3):
        sock.sendto(b"unanswered", (ADDR.server4, ECHO_PORT))
        with pytest.raises(TimeoutError):
            sock.recv(100)
    lines = session_lines(relay, at_least=1)
    assert lines[0]["end"] == "refused"
    assert relay.log_text().count("refused UDP ASSOCIATE") == 1
    download(lab, 100_000)  # TCP through the same relay and rules: untouched (it checks size and sha256)


FAKE_PROXY_PORT = 1090
METRICS_PORT = 9317


def metric(lab, name: str) -> dict[str, float]:
    """The samples of one metric family from the relay's /metrics, by their label text."""
    text = lab.run("router", ["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            samples[key[len(name) :]] = float(value)
    return samples


@pytest.fixture
def fake_udp_proxy(lab):
    from tests.e2e.fake_udp_proxy import FakeUdpProxy

    proxy = FakeUdpProxy(lab, "far", ADDR.far4, FAKE_PROXY_PORT)
    yield proxy
    proxy.close()


def test_only_well_formed_datagrams_from_the_relay_address_reach_the_client(lab, udp_relay, fake_udp_proxy):
    """The proxy names 0.0.0.0 (its own address); garbage, a fragment and a stranger's datagram come first."""
    udp_relay(fake_udp_proxy.url, "--metrics", f"127.0.0.1:{METRICS_PORT}")
    sock = client_socket(lab)
    for number in range(3):
        payload = f"echo {number}".encode()
        assert round_trip(sock, payload) == (payload, (ADDR.server4, ECHO_PORT))
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(100)  # nothing else came
    drops = metric(lab, "relay_udp_dropped_total")
    assert drops == {  # a stranger's datagrams never reach the association's socket, which is connected
        '{reason="fragment"}': 3.0,
        '{reason="malformed"}': 12.0,
    }
    assert metric(lab, "relay_udp_datagrams_total") == {'{direction="up"}': 3.0, '{direction="down"}': 3.0}
    assert metric(lab, "relay_udp_sessions_active") == {"": 1.0}


def test_the_status_page_shows_udp_sessions_datagrams_and_drops(lab, udp_relay, fake_udp_proxy, chromium, tmp_path):
    from tests.e2e.test_status_page import METRICS_PORT as PAGE_PORT
    from tests.e2e.test_status_page import browse, element

    udp_relay(fake_udp_proxy.url, "--metrics", f"127.0.0.1:{PAGE_PORT}")
    sock = client_socket(lab)
    assert round_trip(sock, b"echo") == (b"echo", (ADDR.server4, ECHO_PORT))  # after a fragment and 4 malformed
    udp = element(browse(lab, chromium, tmp_path / "profile", "--dump-dom", budget_ms=4000), "udp", "</p>")
    assert "sessions 1 " in udp and "datagrams up 1 (" in udp and ", down 1 (" in udp, udp
    assert "dropped fragment 1, malformed 4" in udp, udp


@pytest.mark.parametrize(("how", "end"), [("close", "proxy-closed"), ("reset", "proxy-econnreset")])
def test_the_proxy_closing_the_control_connection_ends_the_session(lab, udp_relay, fake_udp_proxy, how, end):
    relay = udp_relay(fake_udp_proxy.url, "--udp-idle-timeout", "60")
    sock = client_socket(lab)
    assert round_trip(sock, b"first")[0] == b"first"
    sock.sendto(how.encode(), (ADDR.server4, ECHO_PORT))
    [line] = session_lines(relay, at_least=1)
    assert line["end"] == end  # long before its 60 s idle timeout; the fds are checked after
    assert round_trip(sock, b"again")[0] == b"again"  # the service goes on: a new session


def test_dante_dying_ends_every_session_and_leaves_no_fd(lab, udp_relay, relays):
    dante = start_dante(lab, listen=[(ADDR.far4, 1084)], name="dante-dying")
    try:
        relay = udp_relay(f"socks5://{ADDR.far4}:1084", "--udp-idle-timeout", "60")
        sockets = [client_socket(lab) for _ in range(3)]
        for sock in sockets:
            assert round_trip(sock, b"alive")[0] == b"alive"
    finally:
        dante.stop()
    lines = session_lines(relay, at_least=3)
    assert [line["end"] for line in lines] == ["proxy-closed"] * 3
    # relays.finish() then checks the relay is back to its sockets at start.


def test_a_real_resolver_answers_dig_over_udp_through_the_relay(lab, udp_relay, unbound):
    relay = udp_relay()
    answer = lab.run(
        "client", ["dig", "+short", "+tries=1", "+time=5", f"@{unbound.address}", "far-only.example", "A"]
    ).stdout
    assert answer.split() == [ADDR.server4]
    [line] = session_lines(relay, at_least=1)
    assert (line["datagrams-up"], line["datagrams-down"]) == ("1", "1")


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_ipv6_datagrams_come_back_from_the_ipv6_destination(lab, udp_relay, echo, backend):
    udp_relay(backend=backend)
    sock = client_socket(lab, socket.AF_INET6)
    for payload in (b"v6", bytes(range(256)) * 4):
        reply, source = round_trip(sock, payload, (ADDR.server6, ECHO_PORT))
        assert reply == payload and source == (ADDR.server6, ECHO_PORT)
    assert echo.peers[-1][0] == ADDR.far_server_side6


def test_out_of_fds_new_sessions_fail_and_open_ones_go_on(lab, udp_relay):
    relay = udp_relay(UPSTREAMS["dante"], "--udp-idle-timeout", "8")  # past the test, within the settle check
    pid = lab.process(relay.name).pid
    first = client_socket(lab)
    assert round_trip(first, b"first")[0] == b"first"  # its control, its socket, the shared reply socket
    spare = 3  # enough for one more session (control and socket), not for two
    lab.run("router", ["prlimit", f"--pid={pid}", f"--nofile={len(os.listdir(f'/proc/{pid}/fd')) + spare}"])
    answered = []
    for _ in range(3):
        sock = client_socket(lab)
        sock.settimeout(2.0)
        try:
            answered.append(round_trip(sock, b"later")[0] == b"later")
        except TimeoutError:
            answered.append(False)
    assert answered[0] and not answered[-1]
    assert relay.wait_for_log("end=relay-emfile")
    assert round_trip(first, b"still")[0] == b"still"  # the same session: its line has not come
    assert f"client={ADDR.client4}:{first.getsockname()[1]} " not in relay.log_text()


IPERF_PORT = 5201


@pytest.fixture(scope="module")
def iperf3_server(lab):
    lab.spawn("server", ["iperf3", "-s", "-B", ADDR.server4, "-p", str(IPERF_PORT)], name="iperf3-udp")
    lab.wait_tcp("server", ADDR.server4, IPERF_PORT, name="iperf3-udp")
    yield
    lab.stop("iperf3-udp")


@pytest.mark.parametrize("reverse", [False, True], ids=["up", "down"])
def test_iperf3_udp_through_the_relay(lab, udp_relay, iperf3_server, figures, reverse):
    """iperf3's UDP stream through the relay and dante, its TCP control connection through the relay's TCP side."""
    udp_relay()
    argv = ["iperf3", "-c", ADDR.server4, "-p", str(IPERF_PORT), "-u", "-b", "20M", "-t", "2", "--json"]
    result = json.loads(lab.run("client", argv + (["-R"] if reverse else []), timeout=40).stdout)["end"]["sum"]
    figures("20 Mbit/s UDP loss %", round(result["lost_percent"], 2))
    assert result["lost_percent"] < 5 and result["bytes"] > 20e6 / 8 * 2 * 0.9
