"""Running it on a router for months: config file and reload, drain, several upstreams,
bypass, metrics, JSON logs, systemd readiness, privilege drop, workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from relay.lab import ADDR, start_dante
from relay.lab.services import clear_interception
from tests.e2e.clients import connect, download, echoing, expect_reset, upload
from tests.e2e.conftest import RELAY_PORT, UPSTREAMS, ssh_args

SQUID = UPSTREAMS["squid-via-ssh-L"]
DANTE = UPSTREAMS["dante"]


@pytest.fixture
def relay_on_router(relays):
    """start(args, name=...) -> RelayProcess listening on IPv4, with REDIRECT to it."""

    def start(args, name="relay-router", **options):
        return relays.start(
            [*args, "--listen", f"0.0.0.0:{RELAY_PORT}"], name=name, intercept_mode="redirect", **options
        )

    return start


def write_config(lab, text: str) -> str:
    path = lab.tmpdir / "relay.toml"
    path.write_text(text)
    return str(path)


def test_config_file_with_command_line_override_and_reload(relay_on_router, lab):
    path = write_config(lab, f'upstream = ["{DANTE}"]\nconnect-timeout = 3\nsniff = true\n')
    relay = relay_on_router(["--config", path, "--idle-timeout", "120"])
    download(lab, 1 << 20)
    assert relay.connections(at_least=1)[0]["via"] == DANTE

    # A transfer that is open across the reload keeps its upstream and finishes intact.
    long_lived = connect(lab, port=7000)
    long_lived.sendall(b"ECHO\n")
    write_config(lab, f'upstream = ["{SQUID}"]\n')
    os.kill(lab.process(relay.name).pid, signal.SIGHUP)
    assert relay.wait_for_log("SIGHUP: configuration reloaded")
    download(lab, 1 << 20, seed=2)
    long_lived.sendall(b"still here")
    assert long_lived.recv(100) == b"still here"
    long_lived.close()
    vias = [line["via"] for line in relay.connections(at_least=3)]
    assert vias[1] == "http://127.0.0.1:3128" and vias[2] == DANTE  # the reloaded one, then the long-lived one

    write_config(lab, 'upstream = ["gopher://nowhere:70"]\n')
    os.kill(lab.process(relay.name).pid, signal.SIGHUP)
    assert relay.wait_for_log("SIGHUP: keeping the old configuration")
    download(lab, 1 << 20, seed=3)


def test_bad_config_file_is_one_line_and_status_2(lab):
    path = write_config(lab, 'upstream = "127.0.0.1:3128"\nconnect-timeout = "soon"\n')
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--config", path], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"relay: error: {path}: connect-timeout: 'soon' is not a number of seconds above 0"
    path = write_config(lab, 'upstream = "127.0.0.1:3128"\nno-such-thing = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--config", path], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2 and "unknown setting 'no-such-thing'" in result.stderr


def test_sigterm_stops_accepting_and_drains(relay_on_router, lab):
    relay = relay_on_router(["--upstream", DANTE, "--drain-time", "5"])
    held = connect(lab, port=7000)
    held.sendall(b"ECHO\n")
    held.sendall(b"before")
    assert held.recv(100) == b"before"
    process = lab.process(relay.name)
    process.send_signal(signal.SIGTERM)
    assert relay.wait_for_log("draining 1 connections")
    with pytest.raises(ConnectionRefusedError):
        connect(lab, port=7000, timeout=3)  # the listener is closed at once
    held.sendall(b"during the drain")
    assert held.recv(100) == b"during the drain"
    held.close()
    assert process.wait(timeout=5) == 0


def test_drain_time_limits_the_wait_then_resets(relay_on_router, lab):
    relay = relay_on_router(["--upstream", DANTE, "--drain-time", "1"])
    held = connect(lab, port=7000)
    held.sendall(b"ECHO\n")
    process = lab.process(relay.name)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    expect_reset(held, within=5)
    assert process.wait(timeout=5) == 0
    assert 0.8 < time.monotonic() - started < 4


def test_failover_between_upstreams_and_reset_when_none_is_healthy(relay_on_router, lab):
    spare = start_dante(lab, listen=[(ADDR.far4, 1090)], name="dante-spare")
    try:
        first = f"socks5://{ADDR.far4}:1090"
        relay = relay_on_router(
            [
                "--upstream",
                first,
                "--upstream",
                SQUID,
                "--health-interval",
                "0.5",
                "--health-failures",
                "2",
                "--connect-timeout",
                "1",
            ]
        )
        upload(lab, b"x" * 1000)
        spare.stop()
        failures_after_delay, deadline = 0, time.monotonic() + 1.5  # the failover delay: one health interval
        for _ in range(30):
            try:
                upload(lab, b"y" * 1000)
            except OSError:
                if time.monotonic() > deadline:
                    failures_after_delay += 1
            time.sleep(0.05)
        assert failures_after_delay == 0
        assert relay.wait_for_log(f"upstream {first} is unhealthy")
        assert relay.connections(at_least=31)[-1]["via"] == "http://127.0.0.1:3128"
        spare.start()
        assert relay.wait_for_log(f"upstream {first} is healthy again", timeout=5)
        relay.stop()
    finally:
        spare.stop()

    # Alone, an upstream is not checked while healthy: its first failure marks it down here.
    dead = relay_on_router(
        ["--upstream", f"socks5://{ADDR.far4}:1091", "--health-interval", "0.3", "--health-failures", "1"],
        name="relay-dead",
    )
    with connect(lab) as sock:
        expect_reset(sock, within=3)
    with connect(lab) as sock:
        took = expect_reset(sock, within=3)
    assert took < 0.5
    ends = [line["end"] for line in dead.connections(at_least=2)]
    assert ends == ["refused:connect-econnrefused", "refused:no-healthy-upstream"]


def test_health_checks_are_whole_exchanges_in_squids_log_and_none_alone_while_healthy(relay_on_router, lab, figures):
    """A bare connect, as checks were, is logged by squid as NONE_NONE/000
    error:transaction-end-before-headers (360 lines an hour at the default interval). Now a check
    is a request squid answers itself, read to its end; and a lone healthy upstream is not checked."""
    squid_direct = f"http://{ADDR.far4}:3128"  # not through ssh -L: squid sees the checks come from the router

    def checks_logged():
        return [entry for entry in lab.squid.access_log() if entry.client == ADDR.router_wan4]

    before = len(checks_logged())
    relay = relay_on_router(["--upstream", squid_direct, "--upstream", SQUID, "--health-interval", "0.2"])
    deadline = time.monotonic() + 10
    while len(checks_logged()) < before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    relay.stop()
    checks = checks_logged()[before:]
    assert len(checks) >= 5
    assert {(entry.result, entry.method, entry.url) for entry in checks} == {("NONE_NONE/400", "GET", "/")}

    before = len(checks_logged())
    alone = relay_on_router(["--upstream", squid_direct, "--health-interval", "0.2"], name="relay-alone")
    time.sleep(2)  # ten check intervals
    logged = len(checks_logged()) - before
    assert logged == 0
    alone.stop()
    figures("squid log lines per check", "1 (NONE_NONE/400 GET /), was 1 error:transaction-end-before-headers")
    figures("squid log lines per hour, one healthy upstream", f"{logged * 1800:g} (was 3600 / --health-interval: 360)")


def test_bypass_by_address_and_by_domain_goes_direct(relay_on_router, lab):
    # Give the router a path to the server network, as a router would have for bypassed traffic.
    lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lab.run("far", ["ip", "route", "replace", "10.77.1.0/24", "via", ADDR.router_wan4])
    lab.run("router", ["ip", "route", "replace", "10.77.3.0/24", "via", ADDR.far4])
    try:
        relay = relay_on_router(["--upstream", DANTE, "--bypass", f"{ADDR.server4}/32", "--mark", "0x20"])
        upload(lab, b"z" * 100)
        [line] = relay.connections(at_least=1)
        assert line["via"] == "direct"
        relay.stop()
        relay = relay_on_router(["--upstream", DANTE, "--bypass-domain", "relaylab.test"], name="relay-domain")
        with connect(lab, port=7002) as sock:  # nothing listens: only the name decides where it goes
            sock.sendall(b"GET / HTTP/1.1\r\nHost: mirror.relaylab.test\r\n\r\n")
            expect_reset(sock, within=5)
        [line] = relay.connections(at_least=1)
        assert (
            line["name"] == "mirror.relaylab.test"
            and line["via"] == "direct"
            and line["end"] == "refused:connect-econnrefused"
        )
    finally:  # the lab is shared: leave its routing as it was
        lab.run("router", ["ip", "route", "del", "10.77.3.0/24"], check=False)
        lab.run("far", ["ip", "route", "del", "10.77.1.0/24"], check=False)
        lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=0"])


def test_metrics_and_json_logs_carry_no_secret(relay_on_router, lab):
    relay = relay_on_router(
        ["--upstream", UPSTREAMS["dante-auth"], "--metrics", "127.0.0.1:9108", "--log-format", "json"]
    )
    upload(lab, b"m" * 5000)
    with lab.connect("router", "127.0.0.1", 9108) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b""
        while data := sock.recv(65536):
            text += data
    text = text.decode()
    assert "relay_connections_accepted_total 1" in text
    assert 'relay_upstream_healthy{upstream="socks5://relaylab:***@10.77.2.2:1082"} 1' in text
    assert 'relay_bytes_total{direction="up"}' in text and "Lab-pass-42" not in text
    assert relay.wait_for_log('"event": "conn"')
    [entry] = [json.loads(line) for line in relay.log_text().splitlines() if '"event": "conn"' in line]
    assert entry["end"] == "closed" and entry["up"] >= 5000 and "Lab-pass-42" not in relay.log_text()


def test_systemd_notify_ready_reload_stopping(relay_on_router, lab):
    path = str(lab.tmpdir / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    relay = relay_on_router(["--upstream", DANTE], env={"NOTIFY_SOCKET": path})
    assert listener.recv(100) == b"READY=1"
    os.kill(lab.process(relay.name).pid, signal.SIGHUP)
    assert [listener.recv(100), listener.recv(100)] == [b"RELOADING=1", b"READY=1"]
    lab.process(relay.name).send_signal(signal.SIGTERM)
    assert listener.recv(100) == b"STOPPING=1"
    listener.close()


def test_user_drops_root_but_keeps_net_admin(relay_on_router, lab):
    relay = relay_on_router(["--upstream", DANTE, "--mode", "redirect", "--mark", "0x40", "--user", "nobody"])
    status = open(f"/proc/{lab.process(relay.name).pid}/status").read()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert uid_line.split()[1:] == [str(65534)] * 4
    assert int(cap_eff.split()[1], 16) == 1 << 12  # CAP_NET_ADMIN only
    upload(lab, b"after the drop")  # SO_MARK on the upstream socket still works


def test_workers_share_the_port_and_stop_together(relay_on_router, lab):
    relay = relay_on_router(["--upstream", DANTE, "--workers", "2"])
    parent = lab.process(relay.name).pid
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    for seed in range(6):
        download(lab, 100_000, seed=seed)
    lab.process(relay.name).send_signal(signal.SIGTERM)
    assert lab.process(relay.name).wait(timeout=10) == 0


def test_systemd_unit_verifies(tmp_path):
    unit = (
        open("contrib/relay.service")
        .read()
        .replace("/usr/local/bin/relay", os.path.join(os.path.dirname(sys.executable), "relay"))
    )
    (tmp_path / "relay.service").write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "relay.service")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_rules_command_applies_and_removes(relay_on_router, lab):
    """`relay rules --apply` in place of the lab's own interception, then `--remove` leaves nothing."""
    relay = relay_on_router(["--upstream", DANTE, "--mark", "0x1"])
    clear_interception(lab)
    before = lab.run("router", ["nft", "list", "ruleset"]).stdout
    rules = [
        sys.executable,
        "-m",
        "relay",
        "rules",
        "--upstream",
        DANTE,
        "--mark",
        "0x1",
        "--listen",
        f"0.0.0.0:{RELAY_PORT}",
        "--lan-iface",
        ADDR.router_lan_if,
        "--keep-private",
    ]
    lab.run("router", [*rules, "--apply"])
    lab.run("router", [*rules, "--apply"])  # twice: nothing doubles
    once = lab.run("router", ["nft", "list", "ruleset"]).stdout
    assert once.count("table inet relay") == 1
    download(lab, 1 << 20, seed=11)
    assert relay.connections(at_least=1)[0]["end"] == "closed"
    with pytest.raises(OSError):  # the router's own traffic is not intercepted (and it has no route)
        lab.connect("router", ADDR.server4, 7000, timeout=2)
    assert len(relay.connections()) == 1
    lab.run("router", [*rules, "--remove"])
    assert lab.run("router", ["nft", "list", "ruleset"]).stdout == before
    with pytest.raises(OSError):
        connect(lab, timeout=2)  # no interception, and the router has no route to the server


def test_relay_supervises_its_own_ssh_tunnel(relay_on_router, lab):
    """--ssh: the relay runs ssh -N -L to squid as seen from the far host, restarts it when it dies,
    and resets clients at once while it is down."""
    relay = relay_on_router(
        [
            "--upstream",
            "127.0.0.1:3128",  # squid on the far host's loopback
            *ssh_args(lab),
            "--ssh-connections",
            "1",
            "--health-interval",
            "60",
        ]
    )
    download(lab, 4 << 20, seed=21)
    ssh = subprocess.run(
        ["pgrep", "-P", str(lab.process(relay.name).pid), "-x", "ssh"], capture_output=True, text=True
    ).stdout.split()
    assert len(ssh) == 1
    os.kill(int(ssh[0]), signal.SIGKILL)
    with connect(lab) as sock:  # during the restart: a reset, not a hang
        took = expect_reset(sock, within=3)
    assert took < 1
    deadline, attempts = time.monotonic() + 15, 2
    while True:
        attempts += 1
        try:
            download(lab, 1 << 20, seed=22)
            break
        except OSError:
            assert time.monotonic() < deadline, relay.log_text()
            time.sleep(0.2)
    assert relay.wait_for_log("restart")
    ends = [line["end"] for line in relay.connections(at_least=attempts)]
    assert ends[0] == "closed" and ends[1] == "refused:no-healthy-upstream" and ends[-1] == "closed"


def lanes(lab, relay) -> dict[int, int]:
    """Each ssh the relay runs that listens on its -L port: its pid -> how many connections it has accepted
    there now (one just restarted, still logging in, does not listen yet)."""
    pids = subprocess.run(
        ["pgrep", "-P", str(lab.process(relay.name).pid), "-x", "ssh"], capture_output=True, text=True
    ).stdout.split()
    listening = lab.run("router", ["ss", "-tlnpH"]).stdout.splitlines()
    carried = {}
    for pid in map(int, pids):
        for port in {line.split()[3].rsplit(":", 1)[1] for line in listening if f"pid={pid}," in line}:
            established = lab.run("router", ["ss", "-tnH", "state", "established", f"( sport = :{port} )"]).stdout
            carried[pid] = len(established.splitlines())
    return carried


def wait_for_lanes(lab, relay, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while len(lanes(lab, relay)) < count:
        assert time.monotonic() < deadline, relay.log_text()
        time.sleep(0.2)


def test_several_ssh_connections_share_the_load_and_stand_in_for_each_other(relay_on_router, lab):
    """--ssh-connections 2: two ssh processes, new connections to the one carrying fewer; one killed,
    the other carries new connections at once while the first is restarted on its own."""
    relay = relay_on_router(
        # No connections opened ahead: what each ssh carries is then the relayed connections alone.
        [*("--upstream", "127.0.0.1:3128", *ssh_args(lab)), "--ssh-connections", "2", "--preconnect", "off"]
    )
    wait_for_lanes(lab, relay, 2)
    held = echoing(lab, 6)
    try:
        carried = lanes(lab, relay)
        assert sorted(carried.values()) == [3, 3], carried
        victim = min(carried)
        os.kill(victim, signal.SIGKILL)
        for seed in range(5):  # no reset while the other lane is up: each goes to the survivor
            download(lab, 1 << 20, seed=seed)
    finally:
        for sock in held:
            sock.close()
    wait_for_lanes(lab, relay, 2)  # the killed one comes back by itself
    assert relay.wait_for_log("restart")
