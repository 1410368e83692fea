"""The namespace lab itself: topology, sockets in namespaces, each daemon, teardown.

Needs root. Without it these tests are skipped, except under CI (CI set), where
that is a failure: CI must run them.
"""

from __future__ import annotations

import errno
import hashlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.lab import (
    ADDR,
    Lab,
    LabError,
    start_dante,
    start_squid,
    start_ssh_tunnel,
    start_sshd,
)
from relay.lab.servers import TrafficServer, pattern_sha256
from tests import root

pytestmark = pytest.mark.netns

ECHO_PORT = 7000
TRAFFIC_SERVER_PORT = 7001
IO_TIMEOUT = 15.0  # generous: the whole suite shares two cores with squid, sshd and dante


@pytest.fixture(scope="module", autouse=True)
def require_root():
    root.require_root("the namespace lab needs root (ip netns, daemons)")


@pytest.fixture(scope="module")
def lab(require_root):
    with Lab() as lab:
        yield lab


class EchoServer:
    """Echoes every connection it accepts on ``address``:``port`` in ``host``."""

    def __init__(self, lab: Lab, host: str, address: str, port: int):
        self.listener = lab.socket(host, socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # listener closed at lab teardown
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(IO_TIMEOUT)
            try:
                while data := connection.recv(4096):
                    connection.sendall(data)
            except OSError:
                pass


@pytest.fixture(scope="module")
def echo(lab):
    """Echo servers on the server host, IPv4 and IPv6, port ECHO_PORT."""
    return [EchoServer(lab, "server", address, ECHO_PORT) for address in (ADDR.server4, ADDR.server6)]


@pytest.fixture(scope="module")
def squid(lab):
    return start_squid(lab, listen=[("127.0.0.1", 3128), (ADDR.far4, 3128)])


@pytest.fixture(scope="module")
def dante(lab):
    return start_dante(lab)  # on far4 and far6, port 1080, no auth


@pytest.fixture(scope="module")
def sshd(lab):
    return start_sshd(lab)


# -- hand-written proxy handshakes ------------------------------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def assert_echoes(sock: socket.socket) -> None:
    sock.sendall(b"ping through the lab")
    assert recv_exactly(sock, 20) == b"ping through the lab"


def http_connect(sock: socket.socket, address: str, port: int) -> bytes:
    """Send CONNECT; return the status line."""
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"proxy closed during the response head: {head!r}")
        head += chunk
    return head.split(b"\r\n", 1)[0]


def socks5_connect(sock: socket.socket, address: str, port: int, auth: tuple[str, str] | None = None) -> int:
    """SOCKS5 CONNECT to an IP address; return the reply code (0 is success, -1 auth refused)."""
    method = 0x02 if auth else 0x00
    sock.sendall(bytes([5, 1, method]))
    assert recv_exactly(sock, 2) == bytes([5, method])
    if auth:
        user, password = (part.encode() for part in auth)
        sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        if recv_exactly(sock, 2)[1] != 0:
            return -1
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    address_type = 4 if family == socket.AF_INET6 else 1
    sock.sendall(bytes([5, 1, 0, address_type]) + socket.inet_pton(family, address) + struct.pack("!H", port))
    _, reply, _, bound_type = recv_exactly(sock, 4)
    recv_exactly(sock, (16 if bound_type == 4 else 4) + 2)
    return reply


def socks4_connect(sock: socket.socket, address: str, port: int) -> int:
    """SOCKS4 CONNECT; return the reply code (90 is granted)."""
    sock.sendall(bytes([4, 1]) + struct.pack("!H", port) + socket.inet_aton(address) + b"lab\x00")
    return recv_exactly(sock, 8)[1]


# -- topology --------------------------------------------------------------------


@pytest.mark.parametrize("address", [ADDR.router_lan4, ADDR.router_lan6])
def test_client_reaches_router(lab, address):
    listener = lab.socket("router", socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen()
    with lab.connect("client", address, listener.getsockname()[1], timeout=IO_TIMEOUT):
        pass
    listener.close()


@pytest.mark.parametrize("address", [ADDR.server4, ADDR.server6])
def test_router_cannot_reach_server_directly(lab, echo, address):
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        lab.connect("router", address, ECHO_PORT, timeout=IO_TIMEOUT)
    assert failure.value.errno == errno.ENETUNREACH
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("address", [ADDR.server4, ADDR.server6])
def test_far_reaches_server(lab, echo, address):
    with lab.connect("far", address, ECHO_PORT, timeout=IO_TIMEOUT) as sock:
        assert_echoes(sock)


def test_a_preloaded_download_is_the_pattern_and_others_are_still_made(lab):
    server = TrafficServer(lab, "server", ADDR.server4, TRAFFIC_SERVER_PORT)
    try:
        size = 3 << 20
        assert server.preload(size, 4) == pattern_sha256(size, 4)
        for seed in (4, 5):  # preloaded, and made as it is sent
            with lab.connect("far", ADDR.server4, TRAFFIC_SERVER_PORT, timeout=IO_TIMEOUT) as sock:
                sock.sendall(f"DOWN {size} {seed}\n".encode())
                data = b""
                while chunk := sock.recv(1 << 20):
                    data += chunk
            assert hashlib.sha256(data).hexdigest() == pattern_sha256(size, seed)
    finally:
        server.close()


def test_socket_is_created_in_the_requested_namespace(lab):
    with lab.socket("client") as in_client:
        in_client.bind((ADDR.client4, 0))
    with lab.socket("router") as in_router, pytest.raises(OSError) as failure:
        in_router.bind((ADDR.client4, 0))
    assert failure.value.errno == errno.EADDRNOTAVAIL


# -- daemons -----------------------------------------------------------------------


def test_squid_relays_connect_and_logs_the_target(lab, echo, squid):
    with lab.connect("router", ADDR.far4, 3128, timeout=IO_TIMEOUT) as sock:
        assert http_connect(sock, ADDR.server6, ECHO_PORT).startswith(b"HTTP/1.1 200")
        assert_echoes(sock)
    deadline = time.monotonic() + IO_TIMEOUT
    while f"[{ADDR.server6}]:{ECHO_PORT}" not in squid.connect_targets():
        assert time.monotonic() < deadline, squid.access_log()
        time.sleep(0.05)


def test_squid_with_debian_conf_keeps_its_rules(lab):
    EchoServer(lab, "server", ADDR.server4, 443)
    debian = start_squid(
        lab, listen=[("127.0.0.1", 3129), (ADDR.far4, 3129)], debian_default_conf=True, name="squid-debian"
    )
    with lab.connect("far", "127.0.0.1", 3129, timeout=IO_TIMEOUT) as sock:
        assert http_connect(sock, ADDR.server4, ECHO_PORT).startswith(b"HTTP/1.1 403")
    with lab.connect("router", ADDR.far4, 3129, timeout=IO_TIMEOUT) as sock:  # not localhost
        assert http_connect(sock, ADDR.server4, 443).startswith(b"HTTP/1.1 403")
    with lab.connect("far", "127.0.0.1", 3129, timeout=IO_TIMEOUT) as sock:
        assert http_connect(sock, ADDR.server4, 443).startswith(b"HTTP/1.1 200")
        assert_echoes(sock)
    debian.stop()


def test_two_labs_run_squid_at_once(lab, echo, squid):
    with Lab() as other:
        EchoServer(other, "server", ADDR.server4, ECHO_PORT)
        other_squid = start_squid(other, listen=[("127.0.0.1", 3128)])
        for each in (lab, other):
            with each.connect("far", "127.0.0.1", 3128, timeout=IO_TIMEOUT) as sock:
                assert http_connect(sock, ADDR.server4, ECHO_PORT).startswith(b"HTTP/1.1 200")
                assert_echoes(sock)
        assert other_squid.running and squid.running


@pytest.mark.parametrize(
    "proxy, target",
    [
        (ADDR.far4, ADDR.server4),
        (ADDR.far6, ADDR.server6),
        (ADDR.far4, ADDR.server6),
    ],
)
def test_dante_relays_socks5(lab, echo, dante, proxy, target):
    with lab.connect("router", proxy, 1080, timeout=IO_TIMEOUT) as sock:
        assert socks5_connect(sock, target, ECHO_PORT) == 0
        assert_echoes(sock)


def test_dante_checks_username_and_password(lab, echo):
    start_dante(lab, listen=[(ADDR.far4, 1081)], auth=("relaylab-labtest", "lab-secret"), name="dante-auth")
    with lab.connect("router", ADDR.far4, 1081, timeout=IO_TIMEOUT) as sock:
        assert socks5_connect(sock, ADDR.server4, ECHO_PORT, auth=("relaylab-labtest", "wrong")) == -1
    with lab.connect("router", ADDR.far4, 1081, timeout=IO_TIMEOUT) as sock:
        assert socks5_connect(sock, ADDR.server4, ECHO_PORT, auth=("relaylab-labtest", "lab-secret")) == 0
        assert_echoes(sock)


def test_ssh_local_forward_reaches_squid_on_far(lab, echo, squid, sshd):
    tunnel = start_ssh_tunnel(lab, sshd, forwards=["-L", "127.0.0.1:3128:127.0.0.1:3128"], name="ssh-L")
    with lab.connect("router", "127.0.0.1", 3128, timeout=IO_TIMEOUT) as sock:
        assert http_connect(sock, ADDR.server4, ECHO_PORT).startswith(b"HTTP/1.1 200")
        assert_echoes(sock)
    tunnel.stop()


def test_ssh_dynamic_forward_speaks_socks5_and_socks4_and_restarts(lab, echo, sshd):
    tunnel = start_ssh_tunnel(lab, sshd, forwards=["-D", "127.0.0.1:1081"], name="ssh-D")
    with lab.connect("router", "127.0.0.1", 1081, timeout=IO_TIMEOUT) as sock:
        assert socks5_connect(sock, ADDR.server6, ECHO_PORT) == 0
        assert_echoes(sock)
    with lab.connect("router", "127.0.0.1", 1081, timeout=IO_TIMEOUT) as sock:
        assert socks4_connect(sock, ADDR.server4, ECHO_PORT) == 90
        assert_echoes(sock)

    tunnel.kill()
    assert not tunnel.running
    with pytest.raises(ConnectionRefusedError):
        lab.connect("router", "127.0.0.1", 1081, timeout=IO_TIMEOUT)
    tunnel.restart()
    with lab.connect("router", "127.0.0.1", 1081, timeout=IO_TIMEOUT) as sock:
        assert socks5_connect(sock, ADDR.server4, ECHO_PORT) == 0
        assert_echoes(sock)


def test_wait_tcp_shows_the_log_of_a_process_that_died(lab):
    lab.spawn("far", ["sh", "-c", "echo listener gave up; exit 3"], name="doomed")
    with pytest.raises(LabError, match="listener gave up"):
        lab.wait_tcp("far", "127.0.0.1", 9, timeout=5, name="doomed")


# -- teardown ----------------------------------------------------------------------


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_teardown_removes_everything_after_an_exception(require_root, interruption):
    with pytest.raises(interruption):
        with Lab() as doomed:
            sleeper = doomed.spawn("server", ["sleep", "60"], name="sleeper")
            names = {doomed.ns(host) for host in doomed.hosts}
            tmpdir = doomed.tmpdir
            assert names <= _namespaces()
            raise interruption()
    assert sleeper.poll() is not None
    assert not names & _namespaces()
    assert not tmpdir.exists()
    doomed.close()  # idempotent


def test_ctrl_c_tears_down_a_lab_in_another_process(require_root):
    # A real SIGINT, as from a terminal: spawned daemons live in their own
    # process group, so the lab (not the signal) must stop them.
    program = (
        "import signal, sys, time\n"
        "from relay.lab import Lab\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # our parent may ignore it
        "with Lab() as lab:\n"
        "    sleeper = lab.spawn('server', ['sleep', '60'], name='sleeper')\n"
        "    print(lab.prefix, sleeper.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", program], cwd=repo, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        prefix, sleeper_pid = child.stdout.readline().split()
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
    assert "KeyboardInterrupt" in stderr
    assert not any(name.startswith(prefix + "-") for name in _namespaces())
    assert not Path("/proc", sleeper_pid).exists()


def test_namespaces_of_a_dead_lab_are_removed(require_root):
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait(10)
    stale = f"rl{dead_pid.pid}x0-client"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        with Lab():
            assert stale not in _namespaces()
    finally:
        if Path("/run/netns", stale).exists():
            subprocess.run(["ip", "netns", "delete", stale], timeout=10)
