"""After every end-to-end case: the relay's fds, RSS and sockets are back near where they
started, so a case that leaks a connection, a pipe or memory fails even if its clients
were served."""

import ipaddress
import os
import time
import tomllib
from dataclasses import dataclass

from relay.config import ConfigError, parse_upstream
from relay.net.preconnect import AUTO_MAX, KEPT_MAX

# Lingering allocations are not leaks: pymalloc arenas, and empty pipes the fast path keeps
# for reuse (a pool of at most 64, two fds each). Sockets have no such excuse.
SOCKET_SLACK = 1
PIPE_FD_SLACK = 2 * 64
RSS_SLACK_KIB = 24 * 1024
SETTLE_SECONDS = 10.0
# A relay holding a socket in one of these states after every client left is holding a
# connection nobody will finish.
STUCK_STATES = ("close-wait", "fin-wait-2", "last-ack")
# Connections the relay keeps to its proxies for clients to come (relay.net.preconnect: opened ahead,
# or left idle by a plain-HTTP client) are not leaks: idle (nothing queued either way), and bounded.
PRECONNECT_SLACK = 2 * 4 * (AUTO_MAX + KEPT_MAX)  # both ends where the relay runs ssh -L


@dataclass(frozen=True)
class Usage:
    sockets: int
    pipe_fds: int
    rss_kib: int

    def __str__(self) -> str:
        return f"{self.sockets} sockets, {self.pipe_fds} pipe fds, {self.rss_kib} KiB RSS"

    def near(self, baseline: "Usage", rss_slack_kib: int, pooled: int = 0) -> bool:
        return (
            self.sockets <= baseline.sockets + SOCKET_SLACK + pooled
            and self.pipe_fds <= baseline.pipe_fds + PIPE_FD_SLACK
            and self.rss_kib <= baseline.rss_kib + rss_slack_kib
        )


def group_pids(leader: int) -> list[int]:
    """The relay and its workers: the process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    pids, pending = [], [leader]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending += children.get(pid, [])
    return pids


def usage(leader: int) -> Usage:
    sockets = pipes = rss = 0
    for pid in group_pids(leader):
        try:
            targets = [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            sockets += sum(target.startswith("socket:") for target in targets)
            pipes += sum(target.startswith("pipe:") for target in targets)
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:  # exited meanwhile
            continue
    return Usage(sockets, pipes, rss)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def stuck_sockets(lab, host: str, leader: int) -> list[str]:
    pids = {f"pid={pid}," for pid in group_pids(leader)}
    states = [arg for state in STUCK_STATES for arg in ("state", state)]
    lines = lab.run(host, ["ss", "-tanpH", *states]).stdout.splitlines()
    return [line for line in lines if any(pid in line for pid in pids)]


def preconnected(lab, relay, leader: int) -> int:
    """How many of the relay's sockets belong to connections it keeps to its proxies for clients to come:
    idle, to one of its --upstream proxies or to the port of an ssh it runs (whose accepted end counts
    too). Opened ahead, they never carried a byte; left by a plain-HTTP client, nothing is queued."""
    proxies, given = set(), []
    for option, value in zip(relay.argv, relay.argv[1:]):
        if option == "--upstream":
            given.append(value)
        elif option == "--config":  # as it is now: the relay closes the pools of upstreams a reload removed
            configured = tomllib.loads(open(value).read()).get("upstream", [])
            given += configured if isinstance(configured, list) else [configured]
    for value in given:
        if isinstance(value, dict):  # an upstream with settings of its own: {url = ..., early-data = ...}
            value = value.get("url", "")
        try:
            upstream = parse_upstream(value)
        except ConfigError:
            continue
        if upstream.host:
            proxies.add((ipaddress.ip_address(upstream.host), upstream.port))
    pids = {f"pid={pid}," for pid in group_pids(leader)}
    for line in lab.run(relay.host, ["ss", "-tlnpH"]).stdout.splitlines():
        if '(("ssh",' in line and any(pid in line for pid in pids):
            proxies.add(_endpoint(line.split()[3]))
    lines = lab.run(relay.host, ["ss", "-tnpH", "state", "established"]).stdout.splitlines()
    count = 0
    for socket_line in lines:
        receive_queue, send_queue, local, peer = socket_line.split()[:4]
        if not any(pid in socket_line for pid in pids) or receive_queue != "0" or send_queue != "0":
            continue
        count += _endpoint(peer) in proxies or _endpoint(local) in proxies
    return count


def _endpoint(text: str) -> tuple:
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]").split("%")[0]), int(port)


def assert_settled(
    lab, relay, baseline: Usage, *, timeout: float = SETTLE_SECONDS, rss_slack_kib: int = RSS_SLACK_KIB
) -> Usage:
    """Wait until the relay is back near ``baseline`` with no stuck socket; returns its usage."""
    leader = lab.process(relay.name).pid
    deadline = time.monotonic() + timeout
    while True:
        now, stuck = usage(leader), stuck_sockets(lab, relay.host, leader)
        pooled = min(preconnected(lab, relay, leader), PRECONNECT_SLACK)
        settled = now.near(baseline, rss_slack_kib, pooled)
        if (settled and not stuck) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not stuck, f"{relay.name} still holds sockets:\n" + "\n".join(stuck)
    assert settled, f"{relay.name} did not settle: {now} now, {baseline} at start"
    return now
