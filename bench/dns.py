"""relay --dns against sshuttle --dns and dnsmasq: cache hits and misses, in one run.

Builds the namespace lab and, on the router, three resolvers for the client:
  relay      relay --dns, resolving by DoH (one HTTP/2 connection, the default kind) through dante
             (SOCKS5) on far; and relay-tcp, the same with a tcp:// upstream (pipelined queries)
  sshuttle   Debian's sshuttle --dns (nat method): queries to the router's address redirected to
             sshuttle, carried over its SSH connection to far, asked there of far's resolv.conf's
             resolver; no cache
  dnsmasq    Debian's dnsmasq as the router's usual cache, its upstream the far unbound, directly
             (only its cache hits are compared)
Every one of them asks the same unbound on far (relay.lab.start_unbound), which answers every
name under bench.example. with one A record. The SSH connection and the proxy connection pass a
TCP delay line on the router (relay/lab/delayline.py: --rtt-ms, half each way; this kernel has no
netem), so a miss costs that round trip plus unbound's own time, for relay and sshuttle alike.

Cases, each run by bench/benchtool.c's dns client (C, so that the load is not the limit: UDP,
--concurrency queries in flight, for --seconds) in the client namespace, from --sources addresses
in turn:
  hit   relay, dnsmasq: 200 names (each with an address of its own, or with --hit-addresses one
        all with the same), each asked twice just before the run (not measured: the first fills
        the cache, the second gives the relay's fast path its answer), then over and over
  miss  relay, relay-tcp, sshuttle: a name never asked before every time; relay's metrics
        confirm that each went upstream
Rounds interleave the contenders (the order reversed every other round), as this machine drifts
20-30 % between runs: the table gives each one's median over the rounds and its ratio to the
baseline measured in the same run (sshuttle for misses, dnsmasq for hits), against the targets.
CPU: each contender's own processes on the router (and its far side: dante, or sshd with
sshuttle's server), the load generator, and the whole machine from /proc/stat (over each run's
timed part, read by the load generator). Everything goes
to bench/results/dns-DATE.json (or --out).

Run as root on a machine set up by scripts/setup:  .venv/bin/python bench/dns.py
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file is named dns.py: with its directory first on sys.path, "import dns" (dnspython, which
# relay uses) would find it. Its directory goes last, where testbed is still found.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.append(sys.path.pop(0))

from testbed import BenchError, cannot_run, compile_benchtool, cpu_seconds, first_line, process_tree  # noqa: E402

from relay.lab import ADDR, Lab, start_dante, start_delay_line, start_sshd, start_unbound  # noqa: E402
from relay.lab.services import LAB_DNS_DATA, RelayProcess  # noqa: E402

RESULTS = HERE / "results"
NEEDED_COMMANDS = ("sshuttle", "dnsmasq", "unbound", "danted", "sshd", "ssh", "iptables", "gcc")
ZONE = "bench.example."
ANSWER = ADDR.server4  # what unbound answers for every name in ZONE
# Hit names with an address each (--hit-addresses each): h<N> in HIT_ZONE is HIT_BASE + N.
HIT_ZONE = "hits.example."
HIT_BASE = ipaddress.ip_address("10.99.0.0")
TTL = 3600  # longer than any run: a primed name stays a hit
SOURCES_FROM = 16  # the client's extra addresses: 10.77.1.16 and up
DNS_PORTS = {"relay": 5301, "relay-tcp": 5303, "dnsmasq": 5302}  # sshuttle: port 53, redirected
RELAY_LISTEN_PORTS = {"relay": 12345, "relay-tcp": 12346}
METRICS_PORTS = {"relay": 9253, "relay-tcp": 9254}
DELAY_SSH_PORT = 2201
DELAY_PROXY_PORT = 1181
SSHUTTLE_PORT = 12300
START_TIMEOUT = 30.0
CASES = {"hit": ("relay", "dnsmasq"), "miss": ("relay", "relay-tcp", "sshuttle")}
BASELINE = {"hit": "dnsmasq", "miss": "sshuttle"}


@dataclass(frozen=True)
class Target:
    key: str
    higher_is_better: bool

    def verdict(self, ratio: float | None) -> str:
        if ratio is None:
            return "n/a"
        miss = 1 - ratio if self.higher_is_better else ratio - 1
        return "ok" if miss <= 0 else f"MISS by {miss * 100:.0f}%"


# The targets: misses at least as fast as sshuttle's, hits as dnsmasq's in qps and p99.
TARGETS = {
    ("miss", "qps"): Target("qps", True),
    ("hit", "qps"): Target("qps", True),
    ("hit", "p99_ms"): Target("p99_ms", False),
}
FIGURES = (("qps", "qps", 0), ("p50_ms", "p50 ms", 1), ("p99_ms", "p99 ms", 1), ("cpu_ms_per_1000", "CPU ms/1000 q", 0))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every case and contender (default 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="queries in flight (default 32)")
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="round trip added to the far side (default 100)")
    parser.add_argument("--sources", type=int, default=200, help="client source addresses (default 200)")
    parser.add_argument("--hit-names", type=int, default=200, help="names asked in the hit case (default 200)")
    parser.add_argument(
        "--hit-addresses",
        choices=("each", "one"),
        default="each",
        help="the hit names' addresses: one each (default), or one for all (a CDN's: the relay's name book then "
        "learns a new name for the address at every answer)",
    )
    parser.add_argument("--out", type=Path, help="where the JSON goes (default bench/results/dns-DATE.json)")
    args = parser.parse_args()
    if not 1 <= args.sources <= 254 - SOURCES_FROM:
        parser.error(f"--sources: 1 to {254 - SOURCES_FROM}")
    return args


def machine() -> dict[str, object]:
    def package(name: str) -> str:
        return first_line(["dpkg-query", "-W", "-f", "${Version}", name])

    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "relay": first_line([sys.executable, "-m", "relay", "--version"]),
        "commit": first_line(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        "uncommitted_changes": bool(
            first_line(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"])
        ),
        **{name: package(name) for name in ("sshuttle", "dnsmasq-base", "unbound", "dante-server", "openssh-server")},
    }


@dataclass
class Contender:
    name: str
    server: tuple[str, int]  # where the client asks
    pid: int = 0  # its main process on the router
    far_pids: list[int] = field(default_factory=list)  # its helpers on far (their trees are counted)

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def far(self) -> list[int]:
        return [pid for root in self.far_pids for pid in process_tree(root)]


class DnsBench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.sources = [f"10.77.1.{SOURCES_FROM + number}" for number in range(args.sources)]
        self.contenders: dict[str, Contender] = {}
        self.checks: dict[str, object] = {}

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        lab = self.lab
        self.tool = compile_benchtool(lab.tmpdir)
        # sshuttle's server (run by sshd on far) asks far's resolv.conf's resolver; sshuttle --dns on the
        # router intercepts queries to the router's resolv.conf's: both set before those start.
        lab.set_resolver("far", ADDR.far_server_side4)
        lab.set_resolver("router", ADDR.router_lan4)
        hit_data = {f"h{n}.{HIT_ZONE}": [("A", str(HIT_BASE + n))] for n in range(self.args.hit_names)}
        self.unbound = start_unbound(lab, data={**LAB_DNS_DATA, **hit_data}, wildcards={ZONE: [("A", ANSWER)]}, ttl=TTL)
        self.sshd = start_sshd(lab)
        self.dante = start_dante(lab, listen=[(ADDR.far4, 1080)], external=ADDR.far_server_side4)
        for name, port, target in (
            ("delay-ssh", DELAY_SSH_PORT, (ADDR.far4, self.sshd.port)),
            ("delay-proxy", DELAY_PROXY_PORT, (ADDR.far4, 1080)),
        ):
            start_delay_line(lab, ("127.0.0.1", port), target, self.args.rtt_ms / 2, name=name)
        batch = lab.tmpdir / "sources.batch"
        batch.write_text("".join(f"address add {source}/24 dev {ADDR.client_if}\n" for source in self.sources))
        lab.run("client", ["ip", "-batch", str(batch)])
        self.start_relay("relay", self.unbound.doh_url)
        self.start_relay("relay-tcp", f"tcp://{self.unbound.address}:53")
        self.start_dnsmasq()
        self.start_sshuttle()
        for contender in self.contenders.values():
            result = self.load(contender, names=1, count=1, timeout=5)
            if result["answered"] != 1:
                raise BenchError(f"{contender.name} does not answer: {result}")

    def start_relay(self, name: str, dns_upstream: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "relay",  # no -v: a log line per upstream question would cost CPU
            "--upstream",
            f"socks5://127.0.0.1:{DELAY_PROXY_PORT}",
            "--listen",
            f"127.0.0.1:{RELAY_LISTEN_PORTS[name]}",
            "--dns",
            f"{ADDR.router_lan4}:{DNS_PORTS[name]}",
            "--dns-upstream",
            dns_upstream,
            "--dns-ca",
            str(self.unbound.ca_file),
            "--metrics",
            f"127.0.0.1:{METRICS_PORTS[name]}",
        ]
        relay = RelayProcess(lab=self.lab, host="router", name=name, argv=argv, ready=("", 0))
        relay.start()
        self.contenders[name] = Contender(
            name, (ADDR.router_lan4, DNS_PORTS[name]), self.lab.process(name).pid, [self.lab.process("dante").pid]
        )

    def start_dnsmasq(self) -> None:
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--server={self.unbound.direct_address}",
            f"--listen-address={ADDR.router_lan4}",
            "--bind-interfaces",
            f"--port={DNS_PORTS['dnsmasq']}",
            "--cache-size=10000",
            "--pid-file=",
            "--user=nobody",
            "--log-facility=-",
        ]
        process = self.lab.spawn("router", argv, name="dnsmasq")
        deadline = time.monotonic() + START_TIMEOUT
        while f":{DNS_PORTS['dnsmasq']} " not in self.lab.run("router", ["ss", "-Hlun"]).stdout:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"dnsmasq did not start: {self.lab.log_tail('dnsmasq')}")
            time.sleep(0.05)
        self.contenders["dnsmasq"] = Contender("dnsmasq", (ADDR.router_lan4, DNS_PORTS["dnsmasq"]), process.pid)

    def start_sshuttle(self) -> None:
        ssh = (
            f"ssh -F /dev/null -i {self.sshd.client_key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
        )
        argv = [
            "sshuttle",
            "--dns",
            "--method",
            "nat",
            # The DNS redirect from the LAN lands on the router's LAN address: listen on every address.
            "--listen",
            f"0.0.0.0:{SSHUTTLE_PORT}",
            "--python",
            "python3",
            "-e",
            ssh,
            "-r",
            f"root@127.0.0.1:{DELAY_SSH_PORT}",
            "10.77.3.0/24",  # it wants a subnet; nothing in this benchmark connects there
        ]
        process = self.lab.spawn("router", argv, name="sshuttle")
        deadline = time.monotonic() + START_TIMEOUT
        while "Connected to server." not in self.lab.log_text("sshuttle"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"sshuttle did not connect: {self.lab.log_tail('sshuttle')}")
            time.sleep(0.05)
        sessions = [pid for pid in process_tree(self.lab.process("sshd").pid) if pid != self.lab.process("sshd").pid]
        self.contenders["sshuttle"] = Contender("sshuttle", (ADDR.router_lan4, 53), process.pid, sessions)

    def stop_sshuttle(self) -> None:
        """SIGTERM to sshuttle alone, as a user's Ctrl-C, so that it restores the firewall itself; then
        say whether any of its rules were left."""
        process = self.lab.process("sshuttle")
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                self.lab.kill("sshuttle")
        deadline = time.monotonic() + 10
        while (left := self.sshuttle_rules()) and time.monotonic() < deadline:
            time.sleep(0.2)  # its firewall process restores after the client is gone
        self.checks["sshuttle rules left after it stopped"] = left
        for rule in left:
            print(f"bench/dns.py: sshuttle left a rule: {rule}", file=sys.stderr)
        self.lab.stop("sshuttle")

    def sshuttle_rules(self) -> list[str]:
        rules = self.lab.run("router", ["iptables-save", "-t", "nat"]).stdout.splitlines()
        return [rule for rule in rules if "sshuttle" in rule]

    # -- measuring --------------------------------------------------------------------------

    def load(
        self,
        contender: Contender,
        *,
        names: int | None,
        count: int = 0,
        seconds: float = 60,
        concurrency: int = 1,
        sources: list[str] = (),
        timeout: float = 2.0,
    ) -> dict:
        """benchtool's dns client against ``contender``: ``names`` hit names asked over and over, or with
        None a new name every time; until ``count`` queries were sent (0: no limit) or ``seconds`` passed."""
        zone, expect = ZONE, ANSWER
        if names is not None and self.args.hit_addresses == "each":
            zone, expect = HIT_ZONE, f"+{HIT_BASE}"
        argv = [
            self.tool,
            "dns",
            *map(str, contender.server),
            zone,
            "miss" if names is None else str(names),
            str(seconds),
            str(concurrency),
            str(count),
            str(timeout),
            ",".join(sources) or "-",
            expect,
        ]
        result = self.lab.run("client", argv, check=False, timeout=seconds + timeout + 30)
        if result.returncode != 0:
            raise BenchError(f"the dns load against {contender.name} failed: {result.stderr.strip()[-500:]}")
        return json.loads(result.stdout)

    def relay_queries(self, name: str) -> dict[str, float]:
        """The relay's relay_dns_queries_total{type="A"} by outcome."""
        text = self.lab.run("router", ["curl", "-s", f"http://127.0.0.1:{METRICS_PORTS[name]}/metrics"]).stdout
        found = re.findall(r'^relay_dns_queries_total\{type="A",outcome="([a-z-]+)"\} (\S+)$', text, re.M)
        return {outcome: float(value) for outcome, value in found}

    def run(self, case: str, contender: Contender) -> dict:
        names = None
        if case == "hit":
            names = self.args.hit_names
            for _ in range(2):  # the first fills the cache; the second hands its answers to the relay's fast path
                primed = self.load(contender, names=names, count=names, concurrency=self.args.concurrency)
                if primed["answered"] != names:
                    raise BenchError(f"priming {contender.name}: {primed}")
        relay_before = self.relay_queries(contender.name) if contender.name.startswith("relay") else None
        cpu_before, far_before = cpu_seconds(contender.pids()), cpu_seconds(contender.far())
        delay_before = cpu_seconds(self.delay_pids())
        run = self.load(
            contender,
            names=names,
            seconds=self.args.seconds,
            concurrency=self.args.concurrency,
            sources=self.sources,
        )
        answered = run["answered"] or 1
        run["cpu_s"] = cpu_seconds(contender.pids()) - cpu_before
        run["cpu_ms_per_1000"] = run["cpu_s"] * 1e6 / answered
        run["far_cpu_ms_per_1000"] = (cpu_seconds(contender.far()) - far_before) * 1e6 / answered
        run["delay_line_cpu_ms_per_1000"] = (cpu_seconds(self.delay_pids()) - delay_before) * 1e6 / answered
        run["load_cpu_ms_per_1000"] = run["load_cpu_s"] * 1e6 / answered
        if relay_before is not None:
            after = self.relay_queries(contender.name)
            run["relay_outcomes"] = {
                key: after.get(key, 0) - relay_before.get(key, 0)
                for key in after
                if after.get(key) != relay_before.get(key)
            }
        return run

    def delay_pids(self) -> list[int]:
        return [self.lab.process(name).pid for name in ("delay-ssh", "delay-proxy")]

    def measure(self, runs: dict) -> None:
        plan = [(case, name) for case, names in CASES.items() for name in names]
        total, done, started = self.args.rounds * len(plan), 0, time.monotonic()
        for number in range(self.args.rounds):
            for case, names in CASES.items():
                for name in names if number % 2 == 0 else reversed(names):
                    try:
                        run = self.run(case, self.contenders[name])
                        text = describe(run)
                    except BenchError as error:
                        run, text = {"error": str(error)}, f"FAILED {error}"
                    done += 1
                    elapsed = int(time.monotonic() - started)
                    print(
                        f"[{done:>3}/{total} {elapsed // 60:>2}m{elapsed % 60:02d}s] round {number + 1} "
                        f"{case:<4} {name:<9}: {text}",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault(case, {}).setdefault(name, []).append({"round": number, **run})


def describe(run: dict) -> str:
    text = (
        f"{run['qps']:.0f} q/s, p50 {fmt(run['p50_ms'], 1)} ms, p99 {fmt(run['p99_ms'], 1)} ms, "
        f"{run['cpu_ms_per_1000']:.0f} CPU ms/1000, machine {run['machine_busy'] * 100:.0f}% busy"
    )
    if run["timeouts"] or run["bad"]:
        text += f", {run['timeouts']} lost, bad {run['bad']}"
    return text


def fmt(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


# -- the table ---------------------------------------------------------------------------------


def summarize(runs: dict) -> dict:
    """case -> contender -> each figure's median over the rounds, and the ratios to the baseline
    (the median of the rounds' ratios, each round's pair measured minutes apart at most)."""
    summary: dict = {}
    keys = [key for key, _, _ in FIGURES] + ["far_cpu_ms_per_1000", "load_cpu_ms_per_1000", "machine_busy"]
    for case, by_name in runs.items():
        good = {name: [run for run in name_runs if "error" not in run] for name, name_runs in by_name.items()}
        summary[case] = {}
        for name, name_runs in good.items():
            figures = {key: median([run.get(key) for run in name_runs]) for key in keys}
            figures["lost"] = sum(run["timeouts"] + sum(run["bad"].values()) for run in name_runs)
            figures["failed_runs"] = len(by_name[name]) - len(name_runs)
            summary[case][name] = figures
        baseline = good.get(BASELINE[case], [])
        for name, name_runs in good.items():
            if name == BASELINE[case]:
                continue
            ratios = {}
            for key, _, _ in FIGURES:
                pairs = [
                    (run.get(key), base.get(key))
                    for run in name_runs
                    for base in baseline
                    if run["round"] == base["round"] and run.get(key) is not None and base.get(key)
                ]
                ratios[key] = median([value / base for value, base in pairs])
            summary[case][name]["vs_" + BASELINE[case]] = ratios
    return summary


def median(values: list) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def render(summary: dict, args: argparse.Namespace) -> tuple[str, list[dict]]:
    lines, rows = [], []
    names = ("relay", "relay-tcp", "sshuttle", "dnsmasq")
    header = f"{'case':<5}{'figure':<15}" + "".join(f"{name:>10}" for name in names)
    header += f"{'relay/base':>12}{'relay-tcp/base':>16}  {'target':<7}verdict"
    lines += [header]
    for case in ("miss", "hit"):
        by_name = summary.get(case, {})
        for key, label, decimals in FIGURES:
            values = {name: by_name.get(name, {}).get(key) for name in names}
            ratio = {n: by_name.get(n, {}).get("vs_" + BASELINE[case], {}).get(key) for n in ("relay", "relay-tcp")}
            target = TARGETS.get((case, key))
            verdict = target.verdict(ratio["relay"]) if target else ""
            target_text = "" if not target else (">=1x" if target.higher_is_better else "<=1x")
            lines.append(
                f"{case:<5}{label:<15}"
                + "".join(f"{fmt(values[name], decimals):>10}" for name in names)
                + f"{fmt_ratio(ratio['relay']):>12}{fmt_ratio(ratio['relay-tcp']):>16}  {target_text:<7}{verdict}"
            )
            rows.append(
                {
                    "case": case,
                    "figure": label,
                    **values,
                    "relay/base": ratio["relay"],
                    "relay-tcp/base": ratio["relay-tcp"],
                    "target": target_text or None,
                    "verdict": verdict or None,
                }
            )
    return "\n".join(lines), rows


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def make_notes(summary: dict, runs: dict, args: argparse.Namespace, checks: dict) -> list[str]:
    cpus = os.cpu_count()
    notes = [
        f"every process of the lab shares this machine's {cpus} CPUs; 'machine' is all of them busy, from /proc/stat; "
        "CPU ms/1000 q is the contender's own processes on the router (relay; dnsmasq; sshuttle with its ssh and "
        "firewall processes)",
        f"the far side is {args.rtt_ms:g} ms away for relay (its proxy connection) and sshuttle (its SSH "
        "connection), through relay/lab/delayline.py; dnsmasq reaches unbound directly, which only its priming uses",
        f"the load: {args.concurrency} queries in flight from {args.sources} source addresses (relay answers a "
        "source at most 100 queries a second after a burst of 200: one address could not load it)",
    ]
    for case, by_name in summary.items():
        for name, figures in by_name.items():
            farside = "dante" if name.startswith("relay") else "sshd + sshuttle's server"
            if figures.get("far_cpu_ms_per_1000") and name != "dnsmasq":
                notes.append(f"{case} {name}: far side ({farside}) {figures['far_cpu_ms_per_1000']:.0f} CPU ms/1000 q")
            if figures["lost"] or figures["failed_runs"]:
                notes.append(
                    f"{case} {name}: {figures['lost']} queries lost or answered wrongly, "
                    f"{figures['failed_runs']} runs failed (see the JSON)"
                )
    load = [figures.get("load_cpu_ms_per_1000") for by_name in summary.values() for figures in by_name.values()]
    if present := [value for value in load if value]:
        notes.append(f"the load generator (C) costs {min(present):.0f}-{max(present):.0f} CPU ms/1000 q itself")
    busy = [figures.get("machine_busy") or 0 for figures in summary.get("hit", {}).values()]
    if busy and max(busy) > 0.9:
        notes.append(
            f"hits: the machine was {max(busy) * 100:.0f}% busy: the contender, the load generator and the lab "
            f"share its {cpus} cores"
        )
    for name, by_run in ((name, runs.get("miss", {}).get(name, [])) for name in ("relay", "relay-tcp")):
        upstream = sum(run.get("relay_outcomes", {}).get("upstream", 0) for run in by_run)
        answered = sum(run.get("answered", 0) for run in by_run)
        if by_run:
            notes.append(f"miss {name}: {upstream:.0f} upstream questions for {answered} answers (its metrics)")
    hits = runs.get("hit", {}).get("relay", [])
    if hits:
        from_cache = sum(run.get("relay_outcomes", {}).get("cache", 0) for run in hits)
        notes.append(
            f"hit relay: {from_cache:.0f} answered from the cache for {sum(r.get('answered', 0) for r in hits)}"
        )
    if "sshuttle rules left after it stopped" in checks:
        left = checks["sshuttle rules left after it stopped"]
        notes.append("sshuttle removed its iptables rules when stopped" if not left else f"sshuttle left {left}")
    return notes


def main() -> int:
    args = parse_args()
    if why := cannot_run(NEEDED_COMMANDS):
        print(f"bench/dns.py: {why}", file=sys.stderr)
        return 2
    record: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": machine(),
        "runs": {},
    }
    status, bench = 0, None
    try:
        with Lab() as lab:
            bench = DnsBench(lab, args)
            bench.build()
            print(f"lab {lab.prefix} up; {args.rounds} rounds", file=sys.stderr, flush=True)
            try:
                bench.measure(record["runs"])
            finally:
                if "sshuttle" in bench.contenders:
                    bench.stop_sshuttle()
    except (BenchError, OSError, subprocess.SubprocessError, KeyboardInterrupt, RuntimeError) as error:
        record["aborted"] = f"{type(error).__name__}: {error}"
        print(f"bench/dns.py: {record['aborted']}", file=sys.stderr)
        status = 1
    record["summary"] = summarize(record["runs"])
    checks = bench.checks if bench else {}
    record["checks"] = checks
    record["notes"] = make_notes(record["summary"], record["runs"], args, checks)
    table, record["table"] = render(record["summary"], args)
    print(table)
    print("\nnotes:\n" + "\n".join(f"- {note}" for note in record["notes"]))
    out = args.out or RESULTS / f"dns-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nraw results: {out}{' (partial: ' + record['aborted'] + ')' if 'aborted' in record else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
