"""relay against redsocks, the routed path and the upstream proxy itself, in one run.

Builds the namespace lab (client -> router running the relay, redsocks and the
upstream proxy on its loopback -> far, routing only -> server) and measures:
  throughput   iperf3, 1 and 8 streams, both directions, with relay CPU s per GB
  short        short connections (100 bytes each way): conn/s, p50/p99 latency,
               relay CPU ms per 1000 connections; also relay --workers 1 vs 2
  idle         relay RSS per idle relayed connection, at 2000 and 10 000
for each upstream: squid (HTTP CONNECT) and dante (SOCKS5), both on the router.
Cases: routed (no relay, no proxy), direct (the client uses the proxy itself),
redsocks, relay. Prints a table with relay/redsocks for every figure against
its target, and writes every run to bench/results/bench-DATE.json.

Run as root on a machine set up by scripts/setup:  python bench/run.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict

import measure
import report
from testbed import (
    NOFILE,
    RELAY_KINDS,
    UPSTREAMS,
    Case,
    RelayRejected,
    RelayUnderTest,
    Testbed,
    cannot_run,
    first_line,
    machine,
    parser_from,
)

from relay.lab import Lab

TESTS = ("throughput", "short", "idle")
NEEDED_COMMANDS = ("redsocks", "squid", "danted", "iperf3", "gcc", "prlimit", "ss", "iptables")
FIRST_RELAY_PORT = 12345


def parse_args() -> argparse.Namespace:
    parser = parser_from(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s per iperf3 test, 1 repetition, 500 short and 500 idle connections",
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=list(TESTS),
        metavar="TESTS",
        help=f"comma-separated subset of {','.join(TESTS)} (default: all)",
    )
    parser.add_argument(
        "--upstreams",
        type=lambda text: text.split(","),
        default=list(UPSTREAMS),
        metavar="NAMES",
        help="comma-separated subset of squid,dante (default: both)",
    )
    parser.add_argument(
        "--relay-args",
        type=shlex.split,
        default=[],
        metavar="ARGS",
        help='extra arguments for every relay process, e.g. "--workers 2 --pipe-size 262144"',
    )
    parser.add_argument("--seconds", type=int, help="length of each iperf3 test (default 10, quick 2)")
    parser.add_argument("--repeat", type=int, help="repetitions of each run, medians reported (default 3, quick 1)")
    args = parser.parse_args()
    for value, allowed, option in ((args.only, TESTS, "--only"), (args.upstreams, UPSTREAMS, "--upstreams")):
        if unknown := set(value) - set(allowed):
            parser.error(f"{option}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return args


def settings_from(args: argparse.Namespace) -> measure.Settings:
    settings = measure.Settings(relay_args=args.relay_args)
    if args.quick:
        settings.seconds, settings.repeat, settings.short_count, settings.idle_counts = 2, 1, 500, (500,)
    settings.seconds = args.seconds or settings.seconds
    settings.repeat = args.repeat or settings.repeat
    return settings


def make_cases(bed: Testbed, upstreams: list[str], relay_args: list[str]) -> list[Case]:
    cases = [Case("routed", "routed")]
    port = FIRST_RELAY_PORT
    for upstream in upstreams:
        cases.append(Case(f"{upstream}/direct", "direct", upstream, throughput_client="bulk"))
        for kind in RELAY_KINDS:
            relay = RelayUnderTest(bed, kind, upstream, port, relay_args if kind == "relay" else [])
            relay.start()
            cases.append(Case(f"{upstream}/{kind}", kind, upstream, relay))
            port += 1
    return cases


def planned_runs(settings: measure.Settings, tests: list[str], cases: list[Case], upstreams: list[str]) -> int:
    relayed = [case for case in cases if case.relay]
    return (
        ("throughput" in tests) * len(measure.throughput_plan(settings, cases + [calibration_case()]))
        + ("short" in tests) * (settings.repeat * len(cases) + measure.workers_runs(settings, upstreams))
        + ("idle" in tests) * len(relayed) * len(settings.idle_counts)
    )


def calibration_case() -> Case:
    """The routed path measured with the direct case's bulk client, to compare that client with iperf3."""
    return Case("routed/bulk", "routed", throughput_client="bulk")


def run(args: argparse.Namespace, settings: measure.Settings, results: dict) -> None:
    tests = [test for test in TESTS if test in args.only]
    with Lab() as lab:
        bed = Testbed(lab, args.upstreams)
        cases = make_cases(bed, args.upstreams, settings.relay_args)
        progress = measure.Progress(planned_runs(settings, tests, cases, args.upstreams))
        print(f"lab {lab.prefix} up; {progress.total} runs planned", file=sys.stderr, flush=True)
        if "throughput" in tests:
            results["throughput"] = measure.measure_throughput(bed, cases + [calibration_case()], settings, progress)
        if "short" in tests:
            results["short"] = measure.measure_short(bed, cases, settings, progress)
            results["workers"] = measure.measure_workers(bed, args.upstreams, settings, progress)
        if "idle" in tests:
            results["idle"] = measure.measure_idle(bed, [case for case in cases if case.relay], settings, progress)


def main() -> int:
    args = parse_args()
    if why := cannot_run(NEEDED_COMMANDS):
        print(f"bench/run.py: {why}", file=sys.stderr)
        return 2
    settings = settings_from(args)
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "settings": asdict(settings),
        "machine": {**machine(), "relay": first_line([sys.executable, "-m", "relay", "--version"])},
        "results": {},
    }
    status = report.attempt(record, "bench/run.py", lambda: run(args, settings, record["results"]), (RelayRejected,))
    notes = report.make_notes(record["results"], args.upstreams, os.cpu_count(), NOFILE)
    table, record["table"] = report.render(record["results"], args.upstreams, notes)
    record["notes"] = notes
    print(table)
    report.save("bench", record)
    return status


if __name__ == "__main__":
    sys.exit(main())
