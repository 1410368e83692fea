"""The relay end to end: client -> router (REDIRECT/TPROXY + relay) -> proxy on far -> server."""

import hashlib
import os
import socket
import time

import pytest

from relay.lab import ADDR, start_sshd
from relay.lab.servers import BannerServer
from tests.e2e.clients import connect, connect_expecting_reset, download, expect_reset, read_all, upload
from tests.e2e.conftest import (
    BANNER_PORT,
    CLOSED_PORT,
    DANTE_PASSWORD,
    HALF_CLOSE_UPSTREAMS,
    RELAY_PORT,
    UPSTREAMS,
)

BIG = 64 << 20


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_64_mib_each_way_arrives_intact(run_relay, lab, upstream):
    relay = run_relay(UPSTREAMS[upstream])
    download(lab, BIG, seed=7)
    upload(lab, os.urandom(BIG))
    lines = relay.connections(at_least=2)
    assert [line["end"] for line in lines] == ["closed", "closed"]
    assert int(lines[0]["down"]) >= BIG and int(lines[1]["up"]) >= BIG
    assert lines[0]["dst"] == f"{ADDR.server4}:7000" and lines[0]["client"].startswith(ADDR.client4)


@pytest.mark.parametrize("upstream", ["squid-via-ssh-L", "dante"])
def test_pure_python_fast_path_gives_the_same_result(run_relay, lab, upstream):
    relay = run_relay(UPSTREAMS[upstream], pure=True)
    assert "forced by RELAY_NO_EXTENSIONS" in relay.log_text()
    download(lab, BIG, seed=8)
    upload(lab, os.urandom(BIG))
    assert [line["end"] for line in relay.connections(at_least=2)] == ["closed", "closed"]


@pytest.mark.parametrize("pure", [False, True], ids=["cython", "python"])
@pytest.mark.parametrize("upstream", HALF_CLOSE_UPSTREAMS)
def test_half_close_both_ways(run_relay, lab, upstream, pure):
    run_relay(UPSTREAMS[upstream], pure=pure)
    check_half_close_both_ways(lab)


@pytest.mark.parametrize("upstream", HALF_CLOSE_UPSTREAMS)
def test_confirmed_fins_keep_half_close_and_clean_ends(run_relay, lab, upstream):
    """--confirm-eof: a live proxy's FIN still arrives as a FIN, the other direction still works."""
    relay = run_relay(UPSTREAMS[upstream], "--confirm-eof", "on")
    check_half_close_both_ways(lab)
    download(lab, 1 << 20, seed=9)
    assert [line["end"] for line in relay.connections(at_least=3)] == ["closed"] * 3


def check_half_close_both_ways(lab):
    # client -> server FIN: the server still answers afterwards.
    data = os.urandom(3 << 20)
    with connect(lab) as sock:
        sock.sendall(b"UPEOF\n" + data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100).strip().decode() == hashlib.sha256(data).hexdigest()
    # server -> client FIN: the client can still send afterwards.
    seen_before = len(lab.traffic.after_eof)
    with connect(lab) as sock:
        sock.sendall(b"DOWNHALF 100000 3\n")
        assert read_all(sock)[0] == 100000
        sock.sendall(b"still talking after your FIN")
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while len(lab.traffic.after_eof) == seen_before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lab.traffic.after_eof[seen_before:] == [b"still talking after your FIN"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_server_that_speaks_first(run_relay, lab, upstream):
    run_relay(UPSTREAMS[upstream])
    with connect(lab, port=BANNER_PORT, timeout=10) as sock:
        banner = b""
        while len(banner) < len(BannerServer.banner):
            banner += sock.recv(4096)
        assert banner == BannerServer.banner
        sock.sendall(b"echo me")
        assert sock.recv(100) == b"echo me"


@pytest.fixture(scope="module")
def server_sshd(lab):
    """A real sshd on the server host's port 22: its banner is what a client reaches by address."""
    sshd = start_sshd(lab, host="server", name="sshd-server")
    yield sshd
    sshd.stop()


@pytest.mark.parametrize("waits", [False, True], ids=["port-22-listed", "none-listed"])
@pytest.mark.parametrize("upstream", ["squid-via-ssh-L", "dante", "ssh-D-socks5"])
def test_an_ssh_banner_by_address_comes_without_the_sniff_wait(run_relay, lab, server_sshd, upstream, waits, figures):
    # Listed (the default), a silent client is dialed at the accept: its banner comes long before a
    # minute's --sniff-timeout. With no port listed, the same client waits the whole --sniff-timeout first.
    extra = ["--server-first-ports", "none", "--sniff-timeout", "1"] if waits else ["--sniff-timeout", "60"]
    relay = run_relay(UPSTREAMS[upstream], *extra)
    started = time.monotonic()
    with connect(lab, port=22, timeout=10) as sock:
        assert sock.recv(100).startswith(b"SSH-2.0-OpenSSH")
        elapsed = time.monotonic() - started
    assert elapsed >= 1 if waits else elapsed < 10
    figures("banner after", f"{elapsed * 1000:.0f} ms")
    [line] = relay.connections(at_least=1)
    assert line["dst"] == f"{ADDR.server4}:22" and "name" not in line


@pytest.mark.parametrize("upstream", ["dante", "dante-auth", "ssh-D-socks5"])
def test_socks5_proxies_take_a_pipelined_handshake(run_relay, lab, upstream):
    # dante 1.4 and Debian 12's OpenSSH 9.2 both parse greeting, authentication and request sent at once.
    relay = run_relay(UPSTREAMS[upstream])
    download(lab, 1 << 20, seed=31)
    upload(lab, os.urandom(1 << 20))
    with connect(lab, port=BANNER_PORT, timeout=10) as sock:
        assert sock.recv(100) == BannerServer.banner
    assert [line["end"] for line in relay.connections(at_least=3)] == ["closed"] * 3
    assert relay.log_text().count("took a pipelined SOCKS5 handshake: so from now on") == 1
    assert "failed a pipelined SOCKS5 handshake" not in relay.log_text()


@pytest.mark.parametrize(
    "upstream,reason",
    [("squid-via-ssh-L", "http-503"), ("dante", "socks5-connection-refused"), ("ssh-D-socks5", "proxy-closed")],
)
def test_refused_destination_resets_the_client(run_relay, lab, upstream, reason):
    relay = run_relay(UPSTREAMS[upstream])
    with connect(lab, port=CLOSED_PORT) as sock:
        expect_reset(sock, within=5)
    [line] = relay.connections(at_least=1)
    assert line["end"].startswith(f"refused:{reason}")


@pytest.mark.parametrize("upstream", ["squid-via-ssh-L", "dante", "ssh-D-socks5"])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_ipv6_and_ipv4_in_both_modes(run_relay, lab, upstream, mode):
    relay = run_relay(UPSTREAMS[upstream], mode=mode)
    download(lab, 4 << 20, seed=4, address=ADDR.server6)
    download(lab, 4 << 20, seed=5, address=ADDR.server4)
    dsts = [line["dst"] for line in relay.connections(at_least=2)]
    assert dsts == [f"[{ADDR.server6}]:7000", f"{ADDR.server4}:7000"]


def test_tproxy_sees_the_original_destination_without_nat(run_relay, lab):
    relay = run_relay(UPSTREAMS["dante"], mode="tproxy")
    upload(lab, b"x" * 1000)
    [line] = relay.connections(at_least=1)
    assert line["dst"] == f"{ADDR.server4}:7000" and line["client"].startswith(ADDR.client4 + ":")


def test_connecting_to_the_relay_port_itself_is_refused(run_relay, lab):
    relay = run_relay(UPSTREAMS["dante"])
    for address in (ADDR.router_lan4, ADDR.router_lan6):
        connect_expecting_reset(lab, "client", address, RELAY_PORT, within=2)
    assert relay.wait_for_log("relay's own listening port")
    assert relay.connections() == []  # no upstream connection was even tried


def test_routing_loop_is_refused_and_mark_breaks_it(run_relay, lab):
    """The router's own traffic is redirected too: without an exemption the relay's upstream
    connection comes back to it; with --mark and a mark match it goes out."""
    redirect_own = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "--dport",
        "3128",
        "-j",
        "REDIRECT",
        "--to-ports",
        str(RELAY_PORT),
    ]
    relay = run_relay(UPSTREAMS["squid-via-ssh-L"])
    lab.run("router", ["iptables", "-w", *redirect_own])
    with connect(lab) as sock:
        expect_reset(sock, within=5)
    assert relay.wait_for_log("routing loop")
    assert len(relay.connections(at_least=1)) == 1  # the client's, refused; the looped one made no upstream connection
    relay.stop()

    relay = run_relay(UPSTREAMS["squid-via-ssh-L"], "--mark", "0x10")
    lab.run(
        "router", ["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-m", "mark", "--mark", "0x10/0x10", "-j", "RETURN"]
    )
    lab.run("router", ["iptables", "-w", *redirect_own])
    download(lab, 1 << 20)
    assert [line["end"] for line in relay.connections(at_least=1)] == ["closed"]


def test_connect_timeout_resets_the_client(run_relay, lab):
    lab.run("router", ["iptables", "-w", "-A", "OUTPUT", "-d", ADDR.far4, "-p", "tcp", "--dport", "3999", "-j", "DROP"])
    try:
        relay = run_relay(f"{ADDR.far4}:3999", "--connect-timeout", "1")
        with connect(lab) as sock:
            took = expect_reset(sock, within=5)
        assert 0.8 < took < 3
        assert relay.connections(at_least=1)[0]["end"] == "refused:connect-timeout"
    finally:
        lab.run("router", ["iptables", "-w", "-F", "OUTPUT"])


def test_handshake_timeout_resets_the_client(run_relay, lab):
    silent = lab.socket("router")
    silent.bind(("127.0.0.1", 3998))
    silent.listen(8)  # accepts (in the kernel) and never answers
    relay = run_relay("socks5://127.0.0.1:3998", "--handshake-timeout", "1")
    with connect(lab) as sock:
        took = expect_reset(sock, within=5)
    assert 0.8 < took < 3
    assert relay.connections(at_least=1)[0]["end"] == "refused:handshake-timeout"
    silent.close()


def test_out_of_fds_pauses_accept_instead_of_spinning(run_relay, lab):
    relay = run_relay(UPSTREAMS["dante"], "--listen", f"0.0.0.0:{RELAY_PORT}")
    pid = lab.process(relay.name).pid
    lab.run("router", ["prlimit", f"--pid={pid}", "--nofile=48:48"])
    held = []
    for _ in range(40):
        try:  # some are reset when the relay has no fd left for their upstream socket
            held.append(connect(lab, port=BANNER_PORT, timeout=10))
        except ConnectionResetError:
            pass
    time.sleep(0.5)
    before = _cpu_seconds(pid)
    time.sleep(2)
    spent = _cpu_seconds(pid) - before
    assert spent < 0.5, f"relay burned {spent:.2f} CPU-s in 2 s while out of fds"
    assert relay.wait_for_log("pausing")
    for sock in held:
        sock.close()
    time.sleep(0.5)
    with connect(lab, port=BANNER_PORT, timeout=10) as sock:
        sock.settimeout(3)
        assert sock.recv(100) == BannerServer.banner


def test_password_never_logged(run_relay, lab):
    """The right password from --upstream-password-file (so not in /proc/PID/cmdline), a wrong one in the URL."""
    password_file = lab.tmpdir / "dante-password"
    password_file.write_text(DANTE_PASSWORD + "\n")
    password_file.chmod(0o600)
    user_only = UPSTREAMS["dante-auth"].replace(f":{DANTE_PASSWORD}@", "@")
    relay = run_relay(user_only, "-vv", "--upstream-password-file", str(password_file))
    cmdline = open(f"/proc/{lab.process(relay.name).pid}/cmdline", "rb").read()
    assert b"--upstream-password-file" in cmdline and DANTE_PASSWORD.encode() not in cmdline
    upload(lab, b"hello")
    assert relay.connections(at_least=1)[0]["end"] == "closed"
    relay.stop()
    wrong = UPSTREAMS["dante-auth"].replace(DANTE_PASSWORD, "Wrong-pass-99")
    relay2 = run_relay(wrong, "-vv")
    with connect(lab) as sock:
        expect_reset(sock, within=5)
    assert relay2.connections(at_least=1)[0]["end"] == "refused:socks5-auth-failed"
    for text in (relay.log_text(), relay2.log_text()):
        assert DANTE_PASSWORD not in text and "Wrong-pass-99" not in text
        assert "relaylab:***@" in text


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
