"""Four network namespaces wired as client -- router -- far -- server.

The router deliberately has no route to the server network: a connection from
the client (or the router itself) can only reach the server through a proxy
running on ``far``, which is what the relay's end-to-end tests need to prove.

Every namespace, process and temporary file a :class:`Lab` makes is removed
when it closes, even after an exception or Ctrl-C. Labs killed too hard to
clean up (SIGKILL) are swept by the next :class:`Lab`: the creating pid is part
of every namespace name.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relay.net.sockets import family_of

HOSTS = ("client", "router", "far", "server")

NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")  # per-namespace files that "ip netns exec" mounts over /etc
# rl<pid>x<counter>-<host>: the pid says whether the lab that made it still runs.
_NETNS_NAME = re.compile(r"^rl(?P<pid>\d+)x\d+-(?:" + "|".join(HOSTS) + r")$")
_TMPDIR_NAME = re.compile(r"^relaylab-rl(?P<pid>\d+)x\d+-")
# Daemons may name POSIX shared memory after the lab (squid -n); SIGKILL leaves it behind.
SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^rl(?P<pid>\d+)x\d+")

STOP_GRACE_SECONDS = 3.0
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_lab_numbers = itertools.count()

T = TypeVar("T")


@dataclass(frozen=True)
class Addresses:
    """Fixed addresses and interface names; every interface is named after its peer."""

    client4: str = "10.77.1.2"
    client6: str = "fd77:1::2"
    client_if: str = "to-router"

    router_lan4: str = "10.77.1.1"
    router_lan6: str = "fd77:1::1"
    router_lan_if: str = "to-client"
    router_wan4: str = "10.77.2.1"
    router_wan6: str = "fd77:2::1"
    router_wan_if: str = "to-far"

    # far as the router sees it: where proxies and sshd listen.
    far4: str = "10.77.2.2"
    far6: str = "fd77:2::2"
    far_if: str = "to-router"
    # far's leg on the server network: where proxies connect from.
    far_server_side4: str = "10.77.3.1"
    far_server_side6: str = "fd77:3::1"
    far_server_side_if: str = "to-server"

    server4: str = "10.77.3.2"
    server6: str = "fd77:3::2"
    server_if: str = "to-far"


ADDR = Addresses()


@dataclass(frozen=True)
class _Link:
    host_a: str
    host_b: str
    addrs_a: tuple[str, str]  # (IPv4/prefix, IPv6/prefix)
    addrs_b: tuple[str, str]


_LINKS = (
    _Link(
        "client",
        "router",
        (f"{ADDR.client4}/24", f"{ADDR.client6}/64"),
        (f"{ADDR.router_lan4}/24", f"{ADDR.router_lan6}/64"),
    ),
    _Link(
        "router", "far", (f"{ADDR.router_wan4}/24", f"{ADDR.router_wan6}/64"), (f"{ADDR.far4}/24", f"{ADDR.far6}/64")
    ),
    _Link(
        "far",
        "server",
        (f"{ADDR.far_server_side4}/24", f"{ADDR.far_server_side6}/64"),
        (f"{ADDR.server4}/24", f"{ADDR.server6}/64"),
    ),
)

_DEFAULT_ROUTES = {
    "client": (ADDR.router_lan4, ADDR.router_lan6),
    "server": (ADDR.far_server_side4, ADDR.far_server_side6),
}


class LabError(RuntimeError):
    """The lab could not be built, or something in it did not come up in time."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run by the lab failed; unlike its base class, shows stderr."""

    def __str__(self) -> str:
        detail = (self.stderr or "").strip()
        return f"{super().__str__()}{': ' + detail if detail else ''}"


def _interface(peer: str) -> str:
    return f"to-{peer}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        pass
    return True


def _netns_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    return [int(pid) for pid in result.stdout.split() if int(pid) != os.getpid()]


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_netns(netns: str, timeout: float = 5.0) -> None:
    # A process left inside would keep the namespace (and its addresses) alive;
    # repeat because a dying daemon may still be forking workers.
    deadline = time.monotonic() + timeout
    while (pids := _netns_pids(netns)) and time.monotonic() < deadline:
        _kill_pids(pids)
        time.sleep(0.02)
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=10)
    shutil.rmtree(ETC_NETNS_DIR / netns, ignore_errors=True)


def remove_stale_labs() -> None:
    """Delete namespaces and temporary directories of labs whose process is gone."""
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            match = _NETNS_NAME.match(entry.name)
            if match and not _pid_alive(int(match["pid"])):
                _delete_netns(entry.name)
    for entry in Path(tempfile.gettempdir()).iterdir():
        match = _TMPDIR_NAME.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in SHM_DIR.iterdir():
        match = _SHM_NAME.match(entry.name)
        if match and not _pid_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)


def run_in_netns(netns: str, function: Callable[[], T], timeout: float = 10.0) -> T:
    """Call ``function`` in a short-lived thread that has joined ``netns``.

    Only that thread changes namespace, so sockets it creates belong to
    ``netns`` while the rest of the process stays where it was.
    """
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({netns}): {os.strerror(code)}")
            finally:
                os.close(fd)
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"call inside namespace {netns} did not finish within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class Lab:
    """The four-namespace lab; use as a context manager (or call start/close)."""

    addr = ADDR
    hosts = HOSTS

    def __init__(self) -> None:
        self.prefix = f"rl{os.getpid()}x{next(_lab_numbers)}"
        self.tmpdir: Path | None = None
        self._created_netns: list[str] = []
        self._processes: dict[str, subprocess.Popen] = {}
        self._log_paths: dict[str, Path] = {}
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the namespaces; on any failure (or Ctrl-C) undo what was built."""
        try:
            remove_stale_labs()
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f"relaylab-{self.prefix}-"))
            # Daemons that drop privileges (squid runs as "proxy") must reach their subdirectory.
            self.tmpdir.chmod(0o711)
            self._build_topology()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every process, delete every namespace and the tmpdir.

        Every step is idempotent and runs even if an earlier one failed or was
        interrupted by Ctrl-C (the first such exception is re-raised at the
        end), so calling close() again finishes an interrupted teardown.
        """
        self._closed = True
        first_error: BaseException | None = None
        for step in (self._close_sockets, self._stop_all_processes, self._delete_all_netns, self._remove_files):
            try:
                step()
            except BaseException as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def _close_sockets(self) -> None:
        # Open sockets pin their namespace in the kernel even after its name is deleted.
        # shutdown() first: it wakes a server thread blocked in accept() on the socket, which
        # close() alone does not; that thread would otherwise stay in accept() on a stale fd
        # number and could pick up connections of the next lab's socket that reuses it.
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected: nothing to wake
            sock.close()

    def _stop_all_processes(self) -> None:
        self._stop(list(self._processes.values()), STOP_GRACE_SECONDS)

    def _delete_all_netns(self) -> None:
        # Also catches what our processes forked into their own sessions (e.g. sshd children).
        while self._created_netns:
            _delete_netns(self._created_netns[-1])
            self._created_netns.pop()

    def _remove_files(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        ours = re.compile(re.escape(self.prefix) + r"(?!\d)")  # rl1x1 must not match rl1x10
        for entry in SHM_DIR.iterdir():
            if ours.match(entry.name):
                entry.unlink(missing_ok=True)

    # -- topology ----------------------------------------------------------

    def pids(self, host: str) -> list[int]:
        """The processes running in ``host``'s namespace now."""
        return _netns_pids(self.ns(host))

    def ns(self, host: str) -> str:
        """The real namespace name of ``host`` (one of :data:`HOSTS`)."""
        if host not in HOSTS:
            raise ValueError(f"unknown lab host {host!r}; expected one of {HOSTS}")
        return f"{self.prefix}-{host}"

    def _build_topology(self) -> None:
        for host in HOSTS:
            subprocess.run(["ip", "netns", "add", self.ns(host)], check=True, capture_output=True, timeout=10)
            self._created_netns.append(self.ns(host))
            self.run(host, ["ip", "link", "set", "lo", "up"])
        self.run("router", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        for number, link in enumerate(_LINKS):
            # Created directly inside the namespaces, so parallel labs never clash on names.
            # Distinct interface indexes: when both ends of a veth share one (each
            # namespace would number its first veth 2), the kernel handles its
            # carrier change lazily, up to 1 s later.
            subprocess.run(
                [
                    "ip",
                    "link",
                    "add",
                    _interface(link.host_b),
                    "netns",
                    self.ns(link.host_a),
                    "index",
                    str(10 + 2 * number),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    _interface(link.host_a),
                    "netns",
                    self.ns(link.host_b),
                    "index",
                    str(11 + 2 * number),
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            )
            for host, peer, (addr4, addr6) in (
                (link.host_a, link.host_b, link.addrs_a),
                (link.host_b, link.host_a, link.addrs_b),
            ):
                self.run(host, ["ip", "addr", "add", addr4, "dev", _interface(peer)])
                # nodad: usable at once instead of "tentative" for a second or two.
                self.run(host, ["ip", "-6", "addr", "add", addr6, "dev", _interface(peer), "nodad"])
        self._bring_links_up()
        for host, (gateway4, gateway6) in _DEFAULT_ROUTES.items():
            self.run(host, ["ip", "route", "add", "default", "via", gateway4])
            self.run(host, ["ip", "-6", "route", "add", "default", "via", gateway6])

    def _bring_links_up(self, timeout: float = 5.0) -> None:
        for link in _LINKS:
            self.run(link.host_a, ["ip", "link", "set", _interface(link.host_b), "up"])
            self.run(link.host_b, ["ip", "link", "set", _interface(link.host_a), "up"])
        # Until the kernel marks a fresh veth operationally up it drops packets,
        # which would cost the first connection a 1 s retransmission.
        deadline = time.monotonic() + timeout
        for host in HOSTS:
            while True:
                links = json.loads(self.run(host, ["ip", "-json", "link", "show", "type", "veth"]).stdout)
                if all(link["operstate"] == "UP" for link in links):
                    break
                if time.monotonic() >= deadline:
                    raise LabError(f"links in {self.ns(host)} not up within {timeout} s: {links}")
                time.sleep(0.01)

    # -- commands and processes ---------------------------------------------

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` and wait for it; output is captured as text."""
        command = ["ip", "netns", "exec", self.ns(host), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise LabCommandError(result.returncode, command, result.stdout, result.stderr)
        return result

    def spawn(self, host: str, argv: Sequence[str], *, name: str) -> subprocess.Popen:
        """Start ``argv`` in the background inside ``host``; it is stopped at teardown.

        Output goes to ``tmpdir/<name>.log`` (appended to, so a restarted
        process under the same name keeps one history).
        """
        if self._closed or self.tmpdir is None:
            raise LabError("the lab is not running")
        previous = self._processes.get(name)
        if previous is not None and previous.poll() is None:
            raise LabError(f"a process named {name!r} is already running (pid {previous.pid})")
        log_path = self.tmpdir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C reaches only us, and teardown can signal helpers too.
                start_new_session=True,
            )
        self._processes[name] = process
        self._log_paths[name] = log_path
        return process

    def process(self, name: str) -> subprocess.Popen:
        """The most recent process spawned under ``name``."""
        return self._processes[name]

    def stop(self, name: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process ``name`` (and its group), SIGKILL after ``grace`` seconds."""
        self._stop([self._processes[name]], grace)

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` and its group at once."""
        self._stop([self._processes[name]], 0.0)

    @staticmethod
    def _stop(processes: Sequence[subprocess.Popen], grace: float) -> None:
        for process in processes:
            # poll() first: once reaped, the pid (and group id) may belong to someone else.
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(5)

    def log_text(self, name: str) -> str:
        """Everything the process ``name`` has written so far."""
        return self._log_paths[name].read_text(errors="replace")

    def log_tail(self, name: str, lines: int = 20) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    # -- name resolution -------------------------------------------------------

    def set_hosts(self, host: str, entries: dict[str, str]) -> None:
        """Give ``host`` its own /etc/hosts (name -> address), as ``ip netns exec`` mounts it,
        and a resolv.conf naming 127.0.0.1, so no lookup ever leaves the lab.

        Only processes started afterwards see them; they are removed with the namespace.
        """
        directory = ETC_NETNS_DIR / self.ns(host)
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"{address} {name}" for name, address in entries.items()]
        (directory / "hosts").write_text("\n".join(lines) + "\n")
        (directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def set_resolver(self, host: str, nameserver: str) -> None:
        """Give ``host`` a resolv.conf naming only ``nameserver`` (its /etc/hosts stays the machine's).

        Only processes started afterwards see it; it is removed with the namespace.
        """
        directory = ETC_NETNS_DIR / self.ns(host)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(f"nameserver {nameserver}\n")

    # -- sockets -------------------------------------------------------------

    def socket(
        self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket living in ``host``'s namespace, usable from any thread; closed at teardown."""
        sock = run_in_netns(self.ns(host), lambda: socket.socket(family, type, proto))
        self._sockets.add(sock)
        return sock

    def connect(self, host: str, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside ``host`` to ``address``:``port`` (IPv4 or IPv6)."""
        sock = self.socket(host, _family(address))
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_tcp(self, host: str, address: str, port: int, timeout: float = 10.0, name: str | None = None) -> None:
        """Poll until a TCP connect from ``host`` to ``address``:``port`` succeeds.

        ``name`` is the process expected to listen there: if it exits, or time
        runs out, the error shows the end of its log.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(host, address, port, timeout=max(0.1, min(1.0, deadline - time.monotonic()))).close()
                return
            except OSError as error:
                last_error = error
            if name is not None and self._processes[name].poll() is not None:
                raise LabError(
                    f"{name} exited with status {self._processes[name].returncode} before "
                    f"{address}:{port} accepted connections in {host}; its log ends with:\n{self.log_tail(name)}"
                )
            if time.monotonic() >= deadline:
                detail = f"; log of {name} ends with:\n{self.log_tail(name)}" if name else ""
                raise LabError(
                    f"{address}:{port} did not accept TCP connections in {host} within {timeout} s "
                    f"(last error: {last_error}){detail}"
                )
            time.sleep(0.05)


def _family(address: str) -> int:
    return family_of(address)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
