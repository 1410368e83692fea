"""The benchmark's lab: what runs where, and how client traffic is sent through each case.

client (10.77.1.2) -> router: relay / redsocks, squid :3128 and dante :1080 on its
loopback (also on its LAN address, for the client to use them directly) -> far,
which only routes -> server (10.77.3.2): iperf3 and the C servers of benchtool.c (an HTTP
server among them, on port 80).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from relay.lab import ADDR, Lab
from relay.lab.services import Service, clear_interception, intercept

# Every daemon and load generator may hold 10 000 connections and more: give
# them all the fds allowed (without CAP_SYS_RESOURCE that is our own hard limit).
NOFILE = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
RAISE_NOFILE = ["prlimit", f"--nofile={NOFILE}:{NOFILE}"]

SERVER = ADDR.server4
IPERF_PORT = 5201
SHORT_PORT = 7000
HOLD_PORT = 7001
BULK_PORT = 7002
HTTP_PORT = 80
EPHEMERAL_PORTS = "16384 65535"  # every port below is under 16384
SERVER_NET = "10.77.3.0/24"
CLIENT_NET = "10.77.1.0/24"

# name -> (scheme for the relay and benchtool, port on the router)
UPSTREAMS = {"squid": ("http", 3128), "dante": ("socks5", 1080)}
RELAY_KINDS = ("relay", "redsocks")
REDSOCKS_FDS_PER_CONNECTION = 6
START_TIMEOUT = 20.0
PROBE_CONNECTIONS = 20  # a case must relay all of these before it is measured


def parser_from(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help is a script's docstring: its first paragraph, then the rest."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def cannot_run(commands: tuple[str, ...]) -> str | None:
    """Why the benchmark cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    if missing := [command for command in commands if not shutil.which(command)]:
        return f"missing {', '.join(missing)}; run scripts/setup first"
    return None


def save_results(results: dict, name: str, out: Path | None = None) -> Path:
    """Write a benchmark's results as JSON: to ``out``, by default bench/results/NAME-COMMIT.json."""
    out = out or Path(__file__).resolve().parent / "results" / f"{name}-{results['commit']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return out


def first_line(argv: list[str]) -> str:
    """The first line a command prints (a version), or why it could not run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


def machine() -> dict[str, object]:
    """What a result depends on besides the relay: cores, fd limit, the other programs' versions."""
    return {
        "cpus": os.cpu_count(),
        "nofile": NOFILE,
        "redsocks": first_line(["dpkg-query", "-W", "-f", "${Version}", "redsocks"]),
        "squid": first_line(["squid", "-v"]),
        "dante": first_line(["danted", "-v"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "kernel": os.uname().release,
    }


class BenchError(RuntimeError):
    """A case could not be set up or does not relay."""


class RelayRejected(BenchError):
    """The relay exited at start, e.g. on an option it does not know."""


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid_text, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue  # exited meanwhile
        ppid = int(rest.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid_text))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CAP_PERIOD_US = 10_000  # short periods: a capped process runs often, in short slices


@contextmanager
def cpu_capped(pids: list[int], share: float, name: str):
    """Each of ``pids`` in a cgroup of its own that may use ``share`` of one CPU (CFS bandwidth
    control, cgroup v2 or v1); back in the root cgroup afterwards. BenchError if neither is there."""
    v2 = (CGROUP_V2 / "cgroup.controllers").exists() and "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text().split()
    root = CGROUP_V2 if v2 else CGROUP_V1_CPU
    if not v2 and not (root / "cpu.cfs_quota_us").exists():
        raise BenchError("no CPU bandwidth control here (neither cgroup v2 cpu.max nor v1 cpu.cfs_quota_us)")
    if v2 and "cpu" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+cpu")
    quota = int(share * CAP_PERIOD_US)
    groups = []
    try:
        for pid in pids:
            group = root / f"bench-{name}-{pid}"
            group.mkdir()
            groups.append(group)
            if v2:
                (group / "cpu.max").write_text(f"{quota} {CAP_PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(CAP_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for group in groups:
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    (root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
            group.rmdir()


def machine_busy_seconds() -> float:
    """Every CPU's non-idle time so far (softirq included), in seconds, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def compile_benchtool(directory: Path) -> str:
    """benchtool.c built into ``directory``: the path of the binary."""
    binary = directory / "benchtool"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(binary), str(Path(__file__).with_name("benchtool.c"))],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return str(binary)


def io_calls(pids: list[int]) -> dict[str, int]:
    """Bytes read and written by ``pids`` so far, sockets included, and the system calls that did it
    (/proc/PID/io: rchar, wchar, syscr, syscw)."""
    totals = dict.fromkeys(("rchar", "wchar", "syscr", "syscw"), 0)
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/io").read_text().splitlines()
        except OSError:
            continue  # exited meanwhile
        for line in lines:
            key, value = line.split(":")
            if key in totals:
                totals[key] += int(value)
    return totals


def cpu_seconds(pids: list[int]) -> float:
    """user + sys of ``pids`` so far."""
    return sum(user_and_kernel_seconds(pids))


def user_and_kernel_seconds(pids: list[int]) -> tuple[float, float]:
    """user and sys of ``pids`` so far, apart: sys holds the kernel's work done in their context
    (splice, and the TCP of the packets they send, softirq included)."""
    user = kernel = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        kernel += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, kernel / tick


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match[1]) if match else 0
    return total


@dataclass
class Case:
    """One way for the client's traffic to reach the server."""

    name: str  # "routed", "squid/direct", "squid/relay", ...
    kind: str  # "routed", "direct", "relay", "redsocks"
    upstream: str | None = None
    relay: RelayUnderTest | None = None
    # iperf3 cannot open a tunnel itself, so the direct case uses benchtool's bulk client.
    throughput_client: str = "iperf3"


@dataclass
class RelayUnderTest:
    """relay or redsocks in the router, listening on its own port, forwarding to one upstream."""

    bed: Testbed
    kind: str  # "relay" or "redsocks"
    upstream: str
    port: int
    extra_args: list[str] = field(default_factory=list)
    label: str = ""
    # The command that runs the relay's Python; bench/ab.py gives each version its own.
    python: list[str] = field(default_factory=lambda: [sys.executable])
    # Where on the router's loopback the relay finds its upstream, if not where the bed started it
    # (bench/http.py --ssh: the local end of an ssh -L).
    upstream_port: int | None = None
    pid: int = 0
    name: str = ""  # of the current process in the lab
    _starts: int = 0

    def start(self) -> None:
        self._starts += 1
        self.label = self.label or f"{self.upstream}-{self.kind}-{self.port}"
        name = f"{self.label}-{self._starts}"
        lab = self.bed.lab
        if self.kind == "relay":
            scheme, upstream_port = UPSTREAMS[self.upstream]
            upstream_port = self.upstream_port or upstream_port
            # No -v: one log line per connection would cost the relay CPU in the short test.
            argv = [
                *RAISE_NOFILE,
                *self.python,
                "-m",
                "relay",
                "--upstream",
                f"{scheme}://127.0.0.1:{upstream_port}",
                "--listen",
                f"0.0.0.0:{self.port}",
                *self.extra_args,
            ]
            process = lab.spawn("router", argv, name=name)
            deadline = time.monotonic() + START_TIMEOUT
            while "listening on" not in lab.log_text(name):
                if process.poll() is not None:
                    raise RelayRejected(
                        f"relay {' '.join(self.extra_args)} exited with status "
                        f"{process.returncode}: {lab.log_tail(name, 1).strip()}"
                    )
                if time.monotonic() > deadline:
                    lab.kill(name)
                    raise BenchError(f"relay did not start: {lab.log_tail(name)}")
                time.sleep(0.05)
        else:
            conf = self.bed.write_redsocks_conf(name, self.upstream, self.port)
            process = lab.spawn("router", [*RAISE_NOFILE, "redsocks", "-c", str(conf)], name=name)
            self.bed.wait_listening(self.port, name)
        self.pid = process.pid
        self.name = name

    def stop(self) -> None:
        self.bed.lab.stop(self.name)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def user_and_kernel_seconds(self) -> tuple[float, float]:
        return user_and_kernel_seconds(self.pids())

    def rss_kib(self) -> int:
        return rss_kib(self.pids())


class Testbed:
    """Builds everything in a running :class:`Lab` and switches between cases."""

    def __init__(self, lab: Lab, upstreams: list[str], squid_lines: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.squid_lines = squid_lines  # more squid.conf lines, e.g. tuning
        self.tool = compile_benchtool(lab.tmpdir)
        self._intercepting: int | None = None
        self._probed: set[str] = set()
        self._route_everything()
        self._start_servers()
        for upstream in upstreams:
            self._start_upstream(upstream)

    # -- building -------------------------------------------------------------------

    def _route_everything(self) -> None:
        # The proxies on the router reach the server themselves, and the routed
        # baseline goes client -> router -> far -> server without any relay.
        self.lab.run("router", ["ip", "route", "add", SERVER_NET, "via", ADDR.far4])
        self.lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.lab.run("far", ["ip", "route", "add", CLIENT_NET, "via", ADDR.router_wan4])
        for host in ("client", "router", "server"):
            # Tens of thousands of short connections in a minute: more ports, TIME-WAIT reused.
            # Still above every port the benchmark listens on, which would otherwise be taken by then.
            self.lab.run(
                host, ["sysctl", "-qw", f"net.ipv4.ip_local_port_range={EPHEMERAL_PORTS}", "net.ipv4.tcp_tw_reuse=1"]
            )

    def _start_servers(self) -> None:
        servers = {
            "iperf3": (["iperf3", "-s", "-B", SERVER], IPERF_PORT),
            "serve-short": ([self.tool, "serve-short", str(SHORT_PORT)], SHORT_PORT),
            "serve-hold": ([self.tool, "serve-hold", str(HOLD_PORT)], HOLD_PORT),
            "serve-bulk": ([self.tool, "serve-bulk", str(BULK_PORT)], BULK_PORT),
            "serve-http": ([self.tool, "serve-http", str(HTTP_PORT)], HTTP_PORT),
        }
        for name, (argv, port) in servers.items():
            self.lab.spawn("server", [*RAISE_NOFILE, *argv], name=name)
            self.lab.wait_tcp("server", SERVER, port, name=name)

    def restart_iperf3(self) -> None:
        """After a failed test: iperf3 -s may still be waiting on the old one."""
        self.lab.stop("iperf3")
        self.lab.spawn("server", [*RAISE_NOFILE, "iperf3", "-s", "-B", SERVER], name="iperf3")
        self.lab.wait_tcp("server", SERVER, IPERF_PORT, name="iperf3")

    def _service_dir(self, name: str) -> Path:
        directory = self.lab.tmpdir / name
        directory.mkdir(exist_ok=True)
        return directory

    def _start_upstream(self, upstream: str) -> None:
        port = UPSTREAMS[upstream][1]
        directory = self._service_dir(upstream)
        if upstream == "squid":
            shutil.chown(directory, "proxy", "proxy")  # squid writes its files as "proxy"
            conf = directory / "squid.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"http_port 127.0.0.1:{port}",
                        f"http_port {ADDR.router_lan4}:{port}",
                        "http_access allow all",
                        "cache deny all",
                        "pinger_enable off",
                        "visible_hostname relaybench",  # no DNS in the namespace
                        f"max_filedescriptors {NOFILE}",
                        "access_log none",  # the same work for every case, but noise on a 2-core VM
                        f"pid_filename {directory}/squid.pid",
                        f"cache_log {directory}/cache.log",
                        f"coredump_dir {directory}",
                        "netdb_filename none",
                        "dns_nameservers 127.0.0.1",
                        "shutdown_lifetime 0 seconds",
                        *self.squid_lines,
                        # squid 5.7 (bookworm's) takes a read into a full request buffer (512 KB by default)
                        # for the client's close and drops the upload, through the relay or not: its bug
                        # 5405, fixed in 6.13. bench/http.py's 512 MiB PUTs lost 16 of 18 in a busy hour, 0 of
                        # 16 with this; squid's RSS grew 4 MB at most all the same (8 uploads at once).
                        "client_request_buffer_max_size 64 MB",
                        "",
                    ]
                )
            )
            # -n names squid's shared memory; the lab removes what starts with its prefix.
            argv = ["squid", "-N", "-d1", "-n", re.sub(r"[^A-Za-z0-9]", "", self.lab.prefix + "bench"), "-f", str(conf)]
        else:
            conf = directory / "danted.conf"
            conf.write_text(
                "\n".join(
                    [
                        "logoutput: stderr",
                        f"internal: 127.0.0.1 port = {port}",
                        f"internal: {ADDR.router_lan4} port = {port}",
                        f"external: {ADDR.router_wan4}",
                        "clientmethod: none",
                        "socksmethod: none",
                        "user.privileged: root",
                        "user.unprivileged: nobody",
                        "client pass { from: 0/0 to: 0/0 }",
                        "socks pass { from: 0/0 to: 0/0 }",
                        "",
                    ]
                )
            )
            argv = ["danted", "-f", str(conf), "-p", str(directory / "danted.pid")]
        Service(self.lab, "router", upstream, [*RAISE_NOFILE, *argv], ready=("127.0.0.1", port)).start()

    def write_redsocks_conf(self, name: str, upstream: str, port: int) -> Path:
        conf = self._service_dir(name) / "redsocks.conf"
        conf.write_text(f"""\
base {{
    log_debug = off; log_info = off; daemon = off; redirector = iptables;
    // Debian's redsocks splices: two sockets and two pipes per connection, made at once. Its
    // default cap (fds / 8) would stop it short of what its fds can carry.
    rlimit_nofile = {NOFILE}; redsocks_conn_max = {NOFILE // REDSOCKS_FDS_PER_CONNECTION};
}}
redsocks {{
    local_ip = 0.0.0.0; local_port = {port};
    ip = 127.0.0.1; port = {UPSTREAMS[upstream][1]};
    type = {"http-connect" if upstream == "squid" else "socks5"};
}}
""")
        return conf

    def wait_listening(self, port: int, name: str) -> None:
        # Not by connecting: a connection that was not redirected would make
        # redsocks ask the proxy for its own address, a loop.
        deadline = time.monotonic() + START_TIMEOUT
        while not self.lab.run("router", ["ss", "-Htln", f"sport = :{port}"]).stdout.strip():
            if self.lab.process(name).poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name} is not listening on {port}: {self.lab.log_tail(name)}")
            time.sleep(0.05)

    # -- cases ----------------------------------------------------------------------

    def use(self, case: Case) -> None:
        """Make the client's connections to the server go through ``case``; probe it once."""
        port = case.relay.port if case.relay else None
        if port != self._intercepting:
            clear_interception(self.lab)
            if port is not None:
                intercept(self.lab, "redirect", port)
            self._intercepting = port
        if case.name not in self._probed:
            result = self.short(case, PROBE_CONNECTIONS, 5, timeout=15)
            if result["ok"] != PROBE_CONNECTIONS:
                raise BenchError(f"{case.name} does not relay: {result}")
            self._probed.add(case.name)

    def proxy_args(self, case: Case) -> list[str]:
        """benchtool's trailing arguments that make it open the tunnel itself (the direct case)."""
        if case.kind != "direct":
            return []
        scheme, port = UPSTREAMS[case.upstream]
        return [scheme, ADDR.router_lan4, str(port)]

    def short(self, case: Case, count: int, concurrency: int, timeout: float) -> dict:
        argv = [
            *RAISE_NOFILE,
            self.tool,
            "short",
            SERVER,
            str(SHORT_PORT),
            str(count),
            str(concurrency),
            str(timeout),
            *self.proxy_args(case),
        ]
        return json.loads(self.lab.run("client", argv, timeout=timeout + 15).stdout)

    def bulk(self, case: Case, seconds: int, streams: int, reverse: bool) -> dict:
        argv = [
            self.tool,
            "bulk",
            SERVER,
            str(BULK_PORT),
            str(seconds),
            str(streams),
            "down" if reverse else "up",
            *self.proxy_args(case),
        ]
        result = json.loads(self.lab.run("client", argv, timeout=seconds + 30).stdout)
        if error := result.pop("error"):
            raise BenchError(f"bulk client: {error}")
        return result

    def iperf3(self, seconds: int, streams: int, reverse: bool) -> dict:
        argv = ["iperf3", "-c", SERVER, "-t", str(seconds), "-P", str(streams), "-J", *(["-R"] if reverse else [])]
        result = self.lab.run("client", argv, check=False, timeout=seconds + 30)
        try:
            report = json.loads(result.stdout)
        except ValueError as error:
            raise BenchError(f"iperf3 failed: {(result.stdout + result.stderr)[-300:]}") from error
        if "error" in report:
            raise BenchError(f"iperf3 failed: {report['error']}")
        received = report["end"]["sum_received"]
        return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}

    def established_to_hold_server(self) -> int:
        listing = self.lab.run("server", ["ss", "-Htn", "state", "established", f"sport = :{HOLD_PORT}"])
        return len(listing.stdout.splitlines())

    def start_holding(self, name: str, count: int, lifetime: int) -> None:
        self.lab.spawn(
            "client", [*RAISE_NOFILE, self.tool, "hold", SERVER, str(HOLD_PORT), str(count), str(lifetime)], name=name
        )


def wait_for(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
