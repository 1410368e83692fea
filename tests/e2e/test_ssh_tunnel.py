"""The supervised ssh tunnel against real OpenSSH in the namespace lab: it runs
inside the router (a small Trio program per test, printing each change of
``up``), logs in to sshd on far, and reaches squid, dante and a server behind far.
Broken by SIGKILL and by silently dropping ssh's packets."""

import ctypes
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from relay.lab import ADDR, Lab, start_dante, start_squid, start_sshd
from relay.lab.servers import TrafficServer
from tests.e2e.clients import receive_exactly
from tests.e2e.conftest import require_root

TRAFFIC_PORT = 7000
ALIVE_INTERVAL, ALIVE_COUNT = 1, 3
CONNECT_TIMEOUT = 2
BACKOFF_MAX = 2.0
DROP_SSH = ["OUTPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"]

RUNNER = """
import json, logging, signal, sys, trio
from relay.net.tunnel import SshTarget, SshTunnel

settings = json.loads(sys.argv[1])
target = SshTarget(**settings.pop("target"))
for key in ("local", "remote"):
    settings[key] = tuple(settings[key]) if settings[key] else None
settings["options"] = tuple(map(tuple, settings["options"]))
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")

async def main():
    tunnel = SshTunnel(target, **settings)
    print(f"local {tunnel.local_address[1]}", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnel.run)
            nursery.start_soon(report, tunnel)
            async for _ in signals:
                nursery.cancel_scope.cancel()

async def report(tunnel):
    while True:
        print(f"state up={tunnel.up} restarts={tunnel.restarts}", flush=True)
        await (tunnel.wait_down if tunnel.up else tunnel.wait_up)(3600)

trio.run(main)
"""


@pytest.fixture(scope="module")
def tunnel_lab():
    require_root()
    with Lab() as lab:
        lab.sshd = start_sshd(lab)
        # Forwarding only: sshd refuses every session (ssh then exits 255, as for any failure).
        lab.sshd_without_sessions = start_sshd(lab, port=2222, name="sshd-no-sessions", settings=("MaxSessions 0",))
        start_squid(lab)  # 127.0.0.1:3128 on far: only reachable through the tunnel
        start_dante(lab)  # 10.77.2.2:1080 on far
        TrafficServer(lab, "server", "::", TRAFFIC_PORT)
        # The lab's own ssh settings only, whatever ~/.ssh/config says.
        lab.ssh_wrapper = lab.tmpdir / "ssh-without-config"
        lab.ssh_wrapper.write_text('#!/bin/sh\nexec ssh -F /dev/null "$@"\n')
        lab.ssh_wrapper.chmod(0o755)
        yield lab


class Runner:
    """An SshTunnel supervising real ssh inside the router namespace."""

    def __init__(self, lab, name, forward, remote=None, **extra):
        self.lab, self.name = lab, name
        settings = {
            "target": {"host": lab.sshd.address, "user": "root"},
            "forward": forward,
            "remote": remote,
            "local": ["127.0.0.1", 0],
            "identity": str(lab.sshd.client_key),
            "ssh_binary": str(lab.ssh_wrapper),
            "options": [
                ["ConnectTimeout", str(CONNECT_TIMEOUT)],
                ["IdentitiesOnly", "yes"],
                ["StrictHostKeyChecking", "no"],
                ["UserKnownHostsFile", "/dev/null"],
            ],
            "alive_interval": ALIVE_INTERVAL,
            "alive_count": ALIVE_COUNT,
            "probe_interval": 0.5,
            "backoff_start": 0.2,
            "backoff_max": BACKOFF_MAX,
            **extra,
        }
        self.process = lab.spawn("router", [sys.executable, "-c", RUNNER, json.dumps(settings)], name=name)
        self.port = int(self.wait_for(r"^local (\d+)$", 0, timeout=10).group(1))

    def log(self) -> str:
        return self.lab.log_text(self.name)

    def wait_for(self, pattern, after: int, timeout: float) -> re.Match:
        """The first line matching ``pattern`` that the runner logged after offset ``after``."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.log()[after:], re.MULTILINE)):
            assert self.process.poll() is None, f"the runner exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s; log:\n{self.log()}"
            time.sleep(0.02)
        return match

    def wait_up(self, after: int, timeout: float) -> None:
        self.wait_for(r"^state up=True", after, timeout)

    def wait_down(self, after: int, timeout: float) -> None:
        self.wait_for(r"^state up=False", after, timeout)

    def ssh_pids(self) -> list[int]:
        """The ssh it runs now: one, or none between restarts."""
        return [pid for pid, parent, command in processes() if parent == self.process.pid and command == "ssh"]

    def stop(self) -> None:
        ssh = self.ssh_pids()
        self.lab.stop(self.name)
        assert self.process.returncode == 0, self.log()
        assert "Traceback" not in self.log(), self.log()
        assert not any(Path(f"/proc/{pid}").exists() for pid in ssh), "ssh outlived the tunnel, or was not reaped"


def tcp_nodelay_of(pids) -> dict[tuple, bool]:
    """Whether each connected TCP socket the processes hold has TCP_NODELAY, by (its address, its peer's): read
    from a copy of the descriptor (pidfd_getfd), as the socket option is the socket's, not the process's."""
    found = {}
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
            entries = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # exited meanwhile
            continue
        try:
            for entry in entries:
                try:
                    if not os.readlink(entry).startswith("socket:"):
                        continue
                except OSError:
                    continue
                copy = LIBC.syscall(PIDFD_GETFD, pidfd, int(entry.name), 0)
                if copy < 0:
                    continue
                with socket.socket(fileno=copy) as sock:
                    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                        continue
                    try:
                        key = (sock.getsockname()[:2], sock.getpeername()[:2])
                    except OSError:  # a listener
                        continue
                    found[key] = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            os.close(pidfd)
    return found


LIBC = ctypes.CDLL(None, use_errno=True)
PIDFD_GETFD = 438  # the syscall's number on x86_64 and arm64 (Linux 5.6)


def processes():
    """(pid, parent pid, command name) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name_end = stat.rindex(")")
        yield int(entry.name), int(stat[name_end + 2 :].split()[1]), stat[stat.index("(") + 1 : name_end]


@pytest.fixture
def start_runner(tunnel_lab, request):
    runners = []

    def start(forward, remote=None, **extra):
        runner = Runner(tunnel_lab, f"{request.node.name}-{len(runners)}", forward, remote, **extra)
        runners.append(runner)
        runner.wait_up(0, timeout=10)
        return runner

    yield start
    for runner in runners:
        runner.stop()


# -- talking through the forward --------------------------------------------------------


def via_http_proxy(sock):
    target = f"{ADDR.server4}:{TRAFFIC_PORT}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += receive_exactly(sock, 1)
    assert head.split(b"\r\n")[0].split()[1] == b"200", head


def via_socks5(sock):
    sock.sendall(b"\x05\x01\x00")
    assert receive_exactly(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ADDR.server4) + TRAFFIC_PORT.to_bytes(2, "big"))
    assert receive_exactly(sock, 10)[:2] == b"\x05\x00"


def assert_echo_through(lab, runner, handshake):
    message = f"through {runner.name}".encode()
    with lab.connect("router", "127.0.0.1", runner.port) as sock:
        handshake(sock)
        sock.sendall(b"ECHO\n" + message)
        assert receive_exactly(sock, len(message)) == message


# -- the cases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "remote,handshake",
    [(("127.0.0.1", 3128), via_http_proxy), ((ADDR.far4, 1080), via_socks5)],
    ids=["squid", "dante"],
)
def test_local_forward_reaches_the_proxy_as_the_far_host_sees_it(tunnel_lab, start_runner, remote, handshake):
    runner = start_runner("local", remote)
    assert_echo_through(tunnel_lab, runner, handshake)


def test_socks_forward_is_ssh_itself(tunnel_lab, start_runner):
    runner = start_runner("socks")
    assert_echo_through(tunnel_lab, runner, via_socks5)


def test_killed_ssh_is_noticed_at_once_and_restarted(tunnel_lab, start_runner):
    runner = start_runner("local", ("127.0.0.1", 3128))
    mark = len(runner.log())
    [ssh] = runner.ssh_pids()
    os.kill(ssh, signal.SIGKILL)
    killed = time.monotonic()
    runner.wait_down(mark, timeout=1)
    assert time.monotonic() - killed < 1
    runner.wait_up(mark, timeout=5)
    assert re.search(r"is down: ssh was killed by SIGKILL( \(ssh said: .*\))?; restarting in 0.2 s", runner.log())
    assert_echo_through(tunnel_lab, runner, via_http_proxy)


def test_silently_dropped_link_is_noticed_and_the_tunnel_comes_back(tunnel_lab, start_runner):
    runner = start_runner("local", ("127.0.0.1", 3128))
    mark = len(runner.log())
    tunnel_lab.run("router", ["iptables", "-w", "-I", *DROP_SSH])
    try:
        dropped = time.monotonic()
        runner.wait_down(mark, timeout=ALIVE_INTERVAL * (ALIVE_COUNT + 1) + 2)
        # The state line and the reason are written by two tasks: either may come first.
        runner.wait_for(
            r"is down: ssh exited with status 255 \(ssh said: .*Timeout, server \S+ not responding", mark, timeout=2
        )
        # While down, nothing listens: a connection is refused at once instead of hanging.
        began = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            tunnel_lab.connect("router", "127.0.0.1", runner.port, timeout=3)
        assert time.monotonic() - began < 0.5
        # Restarts keep failing while the link is dead.
        runner.wait_for(r"(?s)(Connection timed out\); restarting.*){2}", mark, timeout=2 * CONNECT_TIMEOUT + 4)
        assert "up=True" not in runner.log()[mark:]
        assert time.monotonic() - dropped > ALIVE_INTERVAL * ALIVE_COUNT  # not noticed before the keepalives
    finally:
        tunnel_lab.run("router", ["iptables", "-w", "-D", *DROP_SSH])
    healed = len(runner.log())
    runner.wait_up(healed, timeout=CONNECT_TIMEOUT + BACKOFF_MAX + 3)
    assert_echo_through(tunnel_lab, runner, via_http_proxy)


def test_a_session_makes_sshd_send_small_writes_at_once(tunnel_lab, start_runner):
    """OpenSSH's sshd sets TCP_NODELAY on the connection only once a session opens: with -N, the far side's
    small writes in a row wait for an acknowledgement (Nagle). --ssh-session opens one."""
    without, with_session = start_runner("socks", session="off"), start_runner("socks", session="on")
    assert_echo_through(tunnel_lab, with_session, via_socks5)
    sshd_side = tcp_nodelay_of([pid for pid, _, command in processes() if command == "sshd"])
    for runner, expected in ((without, False), (with_session, True)):
        (client_side,) = tcp_nodelay_of(runner.ssh_pids())  # ssh's one connection, to sshd
        address, peer = client_side
        assert sshd_side[(peer, address)] is expected, runner.name


def test_auto_goes_on_without_a_session_where_sshd_allows_none(tunnel_lab, start_runner):
    sshd = tunnel_lab.sshd_without_sessions
    target = {"host": sshd.address, "port": sshd.port, "user": "root"}
    runner = start_runner("socks", session="auto", target=target, identity=str(sshd.client_key))
    # The first ssh may open its forward a moment before sshd refuses its session; the next goes without.
    runner.wait_for(r"going on without a session", 0, timeout=10)
    runner.wait_for(r"^state up=True restarts=1$", 0, timeout=10)
    assert_echo_through(tunnel_lab, runner, via_socks5)
    assert "restarts=2" not in runner.log()
