"""The measurements. Each takes the testbed and the cases, reports every run as
it finishes, and returns raw runs plus their medians."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field

from testbed import (
    PROBE_CONNECTIONS,
    BenchError,
    Case,
    RelayRejected,
    RelayUnderTest,
    Testbed,
    cpu_capped,
    machine_busy_seconds,
    wait_for,
)

HOLD_LIFETIME_S = 900  # the idle clients exit by themselves after this, whatever happens
IDLE_STALL_S = 10  # no new relayed connection for this long: the relay (or proxy) is at a limit
WORKERS_PORT = 12360


@dataclass
class Settings:
    seconds: int = 10
    repeat: int = 3
    streams: tuple[int, ...] = (1, 8)
    short_count: int = 5000
    short_concurrency: int = 50
    idle_counts: tuple[int, ...] = (2000, 10000)
    relay_args: list[str] = field(default_factory=list)


class Progress:
    """One line on stderr per finished run: [done/total elapsed] what: figure."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def report(self, message: str) -> None:
        self.done += 1
        elapsed = int(time.monotonic() - self.started)
        print(
            f"[{self.done:>3}/{self.total} {elapsed // 60:>2}m{elapsed % 60:02d}s] {message}",
            file=sys.stderr,
            flush=True,
        )

    def skip(self, runs: int, why: str) -> None:
        self.total -= runs
        print(f"  skipped: {why}", file=sys.stderr, flush=True)


def median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


# -- throughput ---------------------------------------------------------------------


def figure_name(streams: int, reverse: bool) -> str:
    return f"{streams}x {'down' if reverse else 'up'}"


def throughput_plan(settings: Settings, cases: list[Case]) -> list[tuple[int, bool, int, Case]]:
    # Repetitions interleave the cases, so that drift on a shared VM hits them all alike.
    return [
        (streams, reverse, rep, case)
        for streams in settings.streams
        for reverse in (False, True)
        for rep in range(settings.repeat)
        for case in cases
    ]


def throughput_run(bed: Testbed, case: Case, seconds: int, streams: int, reverse: bool) -> dict:
    """One throughput test through ``case``, with the relay's CPU seconds per GB."""
    bed.use(case)
    before = case.relay.cpu_seconds() if case.relay else 0.0
    machine_before = machine_busy_seconds()
    try:
        if case.throughput_client == "bulk":
            run = bed.bulk(case, seconds, streams, reverse)
        else:
            run = bed.iperf3(seconds, streams, reverse)
    except BenchError:
        if case.throughput_client == "iperf3":
            bed.restart_iperf3()
        raise
    # Every CPU's busy time, softirq included: work the kernel does for a path shows here, not in its process.
    run["machine_cpu_s_per_gb"] = (machine_busy_seconds() - machine_before) / (run["bytes"] / 1e9)
    if case.relay:
        run["cpu_s"] = case.relay.cpu_seconds() - before
        run["cpu_s_per_gb"] = run["cpu_s"] / (run["bytes"] / 1e9)
    return run


THROUGHPUT_FIGURES = ("gbit_s", "cpu_s_per_gb", "machine_cpu_s_per_gb")


def describe_throughput(run: dict, watched: tuple[str, ...] = ()) -> str:
    cpu = f", {run['cpu_s_per_gb']:.2f} CPU s/GB" if "cpu_s_per_gb" in run else ""
    more = "".join(f", {key} {run[key]:.0f}" for key in watched)
    return f"{run['gbit_s']:.2f} Gbit/s{cpu}, machine {run['machine_cpu_s_per_gb']:.2f} s/GB{more}"


def measure_throughput(bed: Testbed, cases: list[Case], settings: Settings, progress: Progress, watch=None) -> dict:
    """Every run of the plan, and per figure and case their medians. ``watch``, when given, is a class
    whose instances are entered around each run; their figures() join the run's, and the names in its
    FIGURES the medians."""
    watched = watch.FIGURES if watch else ()
    runs: dict[str, dict[str, list[dict]]] = {}
    for streams, reverse, rep, case in throughput_plan(settings, cases):
        figure = figure_name(streams, reverse)
        label = f"throughput {figure:<7} {case.name:<16} {rep + 1}/{settings.repeat}"
        try:
            with watch() if watch else contextlib.nullcontext() as watcher:
                run = throughput_run(bed, case, settings.seconds, streams, reverse)
            if watcher is not None:
                run.update(watcher.figures())
            progress.report(f"{label}: {describe_throughput(run, watched)}")
        except BenchError as error:
            run = {"error": str(error)}
            progress.report(f"{label}: FAILED {error}")
        runs.setdefault(figure, {}).setdefault(case.name, []).append(run)
    return {
        figure: {
            name: {**{key: median(case_runs, key) for key in THROUGHPUT_FIGURES + watched}, "runs": case_runs}
            for name, case_runs in by_case.items()
        }
        for figure, by_case in runs.items()
    }


# -- short connections ------------------------------------------------------------------


def short_run(bed: Testbed, case: Case, settings: Settings) -> dict:
    bed.use(case)
    before = case.relay.cpu_seconds() if case.relay else 0.0
    timeout = 60 + settings.short_count / 100
    run = bed.short(case, settings.short_count, settings.short_concurrency, timeout)
    if case.relay and run["ok"]:
        run["cpu_ms_per_1000"] = (case.relay.cpu_seconds() - before) * 1000 / (run["ok"] / 1000)
    return run


def short_summary(runs: list[dict]) -> dict:
    return {
        **{key: median(runs, key) for key in ("conn_per_s", "p50_ms", "p99_ms", "cpu_ms_per_1000")},
        "failed_connections": sum(run.get("errors", 0) + run.get("unfinished", 0) for run in runs),
        "runs": runs,
    }


def describe_short(run: dict) -> str:
    text = f"{run['conn_per_s']:.0f} conn/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms"
    if run.get("cpu_ms_per_1000") is not None:
        text += f", {run['cpu_ms_per_1000']:.0f} CPU ms/1000"
    if run["errors"] or run["unfinished"]:
        text += f", {run['errors']} failed ({run['first_error']}), {run['unfinished']} unfinished"
    return text


def measure_short(bed: Testbed, cases: list[Case], settings: Settings, progress: Progress) -> dict:
    runs: dict[str, list[dict]] = {case.name: [] for case in cases}
    for rep in range(settings.repeat):
        for case in cases:
            label = f"short {case.name:<16} {rep + 1}/{settings.repeat}"
            try:
                run = short_run(bed, case, settings)
                progress.report(f"{label}: {describe_short(run)}")
            except BenchError as error:
                run = {"error": str(error)}
                progress.report(f"{label}: FAILED {error}")
            runs[case.name].append(run)
    return {name: short_summary(case_runs) for name, case_runs in runs.items()}


WORKER_COUNTS = (1, 2)
# For the second comparison, where the relay is the bottleneck: each relay process may use this
# share of one CPU (all processes of the lab share the machine's cores, and uncapped the relay
# is the bottleneck only part of the time).
WORKER_CAP = 0.25
CAPPED = "-capped"


def workers_runs(settings: Settings, upstreams: list[str]) -> int:
    return 2 * settings.repeat * len(WORKER_COUNTS) * len(upstreams)


def measure_workers(bed: Testbed, upstreams: list[str], settings: Settings, progress: Progress) -> dict:
    """The short-connection test against ``relay --workers 1`` and ``--workers 2``; then again with
    each relay process capped at WORKER_CAP of a CPU, so that the relay is what limits the rate."""
    results: dict = {}
    for number, upstream in enumerate(upstreams):
        relays = []
        try:
            for workers in WORKER_COUNTS:
                relay = RelayUnderTest(
                    bed,
                    "relay",
                    upstream,
                    WORKERS_PORT + 10 * number + workers,
                    [*settings.relay_args, "--workers", str(workers)],
                    label=f"{upstream}-relay-workers{workers}",
                )
                relay.start()
                relays.append(relay)
            cases = [
                Case(f"{upstream}/relay-w{workers}", "relay", upstream, relay)
                for workers, relay in zip(WORKER_COUNTS, relays)
            ]
            results[upstream] = measure_short(bed, cases, settings, progress)
            capped = [Case(case.name + CAPPED, case.kind, case.upstream, case.relay) for case in cases]
            try:
                with cpu_capped([pid for relay in relays for pid in relay.pids()], WORKER_CAP, upstream):
                    results[upstream].update(measure_short(bed, capped, settings, progress))
            except BenchError as error:
                progress.skip(settings.repeat * len(WORKER_COUNTS), f"{upstream} capped: {error}")
        except RelayRejected as error:
            results[upstream] = {"skipped": str(error)}
            progress.skip(settings.repeat * len(WORKER_COUNTS), f"{upstream}: {error}")
        finally:
            for relay in relays:
                relay.stop()
    return results


# -- idle connections ----------------------------------------------------------------


def measure_idle(bed: Testbed, cases: list[Case], settings: Settings, progress: Progress) -> dict:
    """RSS of the relay's processes with N idle relayed connections, for each N in turn."""
    results: dict[str, dict] = {}
    for case in cases:
        try:
            case.relay.restart()  # fresh: earlier tests leave freed memory behind
            bed.use(case)
            bed.short(case, PROBE_CONNECTIONS, 5, timeout=15)  # the first connections load code
        except BenchError as error:
            results[case.name] = {"error": str(error)}
            for count in settings.idle_counts:
                progress.report(f"idle {case.name:<16} {count}: FAILED {error}")
            continue
        time.sleep(1)
        rss_before = case.relay.rss_kib()
        holders, opened = [], 0
        results[case.name] = {}
        for count in settings.idle_counts:
            holders.append(f"hold-{case.name.replace('/', '-')}-{count}")
            bed.start_holding(holders[-1], count - opened, HOLD_LIFETIME_S)
            opened = count
            reached = wait_for_connections(bed, count)
            time.sleep(1)  # let the relay finish the handshakes it has started
            rss = case.relay.rss_kib()
            run = {
                "connections": reached,
                "wanted": count,
                "rss_before_kib": rss_before,
                "rss_kib": rss,
                "kib_per_conn": (rss - rss_before) / reached if reached else None,
            }
            results[case.name][str(count)] = run
            short_of = f" (only {reached} of {count} relayed)" if reached < count else ""
            per_conn = f"{run['kib_per_conn']:.2f}" if reached else "-"
            progress.report(
                f"idle {case.name:<16} {count}: RSS {rss_before} -> {rss} KiB, {per_conn} KiB/conn{short_of}"
            )
        for holder in holders:
            bed.lab.stop(holder)
        wait_for(lambda: bed.established_to_hold_server() == 0, timeout=60)
    return results


def wait_for_connections(bed: Testbed, count: int) -> int:
    """Wait until the server holds ``count`` connections or their number stops growing."""
    best, best_at = 0, time.monotonic()
    while True:
        established = bed.established_to_hold_server()
        if established >= count:
            return established
        if established > best:
            best, best_at = established, time.monotonic()
        elif time.monotonic() - best_at > IDLE_STALL_S:
            return established
        time.sleep(0.25)
