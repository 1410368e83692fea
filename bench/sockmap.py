"""The kernel carrying established connections: relay --engine sockmap against splice and redsocks.

One lab, one run (bench/run.py's: client -> router with the relays, redsocks and the upstream proxy
on its loopback -> far -> server), iperf3 1 and 8 streams, up and down, through each path in
turn round by round: redsocks, the relay splicing (the default engine) and the relay with
--engine sockmap. For each: throughput, the path's own CPU seconds per GB (its process tree) and
the whole machine's (/proc/stat, softirq included: with sockmap the relayed bytes are the kernel's
work in softirq, which no process is charged for). Medians of --repeat rounds; results go to
bench/results/sockmap-DATE.json.

Run as root on a machine set up by scripts/setup:  python bench/sockmap.py
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import measure
import report
from testbed import UPSTREAMS, Case, RelayUnderTest, Testbed, cannot_run, first_line, machine, parser_from

from relay.lab import Lab

NEEDED_COMMANDS = ("redsocks", "squid", "danted", "iperf3", "iptables")
# The sockmap relay's backlog bound is raised out of the way: at the default the kernel's missing
# backpressure resets every bulk transfer within 0.1 s (README), and this measures what is left.
PATHS = (
    ("redsocks", "redsocks", []),
    ("relay-splice", "relay", []),
    ("relay-sockmap", "relay", ["--engine", "sockmap", "--sockmap-backlog", str(4 << 30)]),
)
FIRST_PORT = 12345
SAMPLE_EVERY = 0.02
FIGURES = (
    ("gbit_s", "Gbit/s", 2),
    ("cpu_s_per_gb", "own CPU s/GB", 2),
    ("machine_cpu_s_per_gb", "machine CPU s/GB", 2),
    ("tcp_mem_peak_mb", "TCP memory peak MB", 0),
    ("mem_available_fall_mb", "MemAvailable fall MB", 0),
)


def parse_args() -> argparse.Namespace:
    parser = parser_from(__doc__)
    parser.add_argument(
        "--upstream", choices=UPSTREAMS, default="dante", help="the proxy on the router (default dante)"
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each iperf3 run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (default 3)")
    return parser.parse_args()


def carried_by_the_kernel(bed: Testbed, relay: RelayUnderTest) -> None:
    """The sockmap relay must not have fallen back to splice for everything (no CAP_BPF, old kernel)."""
    if "every connection is spliced" in bed.lab.log_text(relay.name):
        raise SystemExit(f"bench/sockmap.py: the kernel refused the sockmap: {bed.lab.log_tail(relay.name)}")


def run(args: argparse.Namespace, results: dict) -> None:
    settings = measure.Settings(seconds=args.seconds, repeat=args.repeat)
    with Lab() as lab:
        bed = Testbed(lab, [args.upstream])
        cases = []
        for port, (name, kind, extra) in enumerate(PATHS, FIRST_PORT):
            relay = RelayUnderTest(bed, kind, args.upstream, port, extra, label=f"{args.upstream}-{name}")
            relay.start()
            cases.append(Case(name, kind, args.upstream, relay))
        carried_by_the_kernel(bed, cases[-1].relay)
        progress = measure.Progress(len(measure.throughput_plan(settings, cases)))
        results["throughput"] = measure.measure_throughput(bed, cases, settings, progress, watch=PeakKernelMemory)
        carried_by_the_kernel(bed, cases[-1].relay)


class PeakKernelMemory:
    """While in the block, the most memory TCP held machine-wide (/proc/net/sockstat's "mem") and the
    largest fall of MemAvailable: bytes the kernel queues between a relayed connection's sockets
    show in the second (a sockmap's queue is not charged to TCP)."""

    FIGURES = ("tcp_mem_peak_mb", "mem_available_fall_mb")

    def __enter__(self):
        self.tcp_pages, self.available_fall, self.done = 0, 0, threading.Event()
        self.available_before = self.available()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def available() -> int:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return 0

    def sample(self) -> None:
        while not self.done.wait(SAMPLE_EVERY):
            self.available_fall = max(self.available_fall, self.available_before - self.available())
            with open("/proc/net/sockstat") as stat:
                for line in stat:
                    if line.startswith("TCP:"):
                        fields = line.split()
                        self.tcp_pages = max(self.tcp_pages, int(fields[fields.index("mem") + 1]))

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def figures(self) -> dict:
        return {
            "tcp_mem_peak_mb": self.tcp_pages * os.sysconf("SC_PAGE_SIZE") / 1e6,
            "mem_available_fall_mb": self.available_fall / 1e6,
        }


def table(results: dict) -> str:
    names = [name for name, _, _ in PATHS]
    lines = [f"{'figure':<30}" + "".join(f"{name:>15}" for name in names) + f"{'sockmap/splice':>16}"]
    for figure, by_case in results.get("throughput", {}).items():
        for key, label, decimals in FIGURES:
            values = [by_case.get(name, {}).get(key) for name in names]
            ratio = values[2] / values[1] if values[1] and values[2] is not None else None
            lines.append(
                f"{figure + ' ' + label:<30}"
                + "".join(f"{report.number(value, decimals):>15}" for value in values)
                + f"{report.number(ratio, 2):>15}x"
            )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if why := cannot_run(NEEDED_COMMANDS):
        print(f"bench/sockmap.py: {why}", file=sys.stderr)
        return 2
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "machine": {**machine(), "relay": first_line([sys.executable, "-m", "relay", "--version"])},
        "results": {},
    }
    status = report.attempt(record, "bench/sockmap.py", lambda: run(args, record["results"]), ())
    record["table"] = table(record["results"])
    print(record["table"])
    report.save("sockmap", record)
    return status


if __name__ == "__main__":
    sys.exit(main())
