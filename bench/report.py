"""The table: every figure per upstream, relay against redsocks, marked against its target."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from measure import CAPPED, WORKER_CAP
from testbed import REDSOCKS_FDS_PER_CONNECTION, BenchError

from relay.lab import LabError

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("routed", "direct", "redsocks", "relay")
UPSTREAM_KINDS = {"squid": "HTTP CONNECT", "dante": "SOCKS5"}
GENERATOR_BOUND = 0.9  # relayed conn/s this close to the routed path's: the generator may be the limit
NOISY_SPREAD = 0.2  # (max - min) / median of repetitions past which the table's figures are flagged


@dataclass(frozen=True)
class Target:
    compare: str  # ">=" or "<="
    value: float
    on_ratio: bool  # relay/redsocks, or else the relay's own figure

    def text(self) -> str:
        return f"{self.compare}{self.value:g}{'x' if self.on_ratio else ' KiB'}"

    def verdict(self, ratio: float | None, relay: float | None) -> str:
        figure = ratio if self.on_ratio else relay
        if figure is None:
            return "n/a"
        miss = 1 - figure / self.value if self.compare == ">=" else figure / self.value - 1
        return "ok" if miss <= 0 else f"MISS by {miss * 100:.0f}%"


AT_LEAST_REDSOCKS = Target(">=", 1.0, True)
CPU_PER_GB = Target("<=", 0.8, True)
CPU_PER_1000_CONN = Target("<=", 1.5, True)
IDLE_KIB_PER_CONN = Target("<=", 4.0, False)


@dataclass
class Row:
    figure: str
    values: dict[str, float | None]  # by column
    decimals: int
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        relay, redsocks = self.values.get("relay"), self.values.get("redsocks")
        return relay / redsocks if relay is not None and redsocks else None

    @property
    def verdict(self) -> str:
        return self.target.verdict(self.ratio, self.values.get("relay")) if self.target else ""

    def as_json(self) -> dict:
        return {
            "figure": self.figure,
            **self.values,
            "relay/redsocks": self.ratio,
            "target": self.target.text() if self.target else None,
            "verdict": self.verdict or None,
        }


def case_name(column: str, upstream: str) -> str:
    return "routed" if column == "routed" else f"{upstream}/{column}"


def rows(results: dict, upstream: str) -> list[Row]:
    def values(by_case: dict, key: str) -> dict[str, float | None]:
        return {column: by_case.get(case_name(column, upstream), {}).get(key) for column in COLUMNS}

    table = []
    throughput = results.get("throughput", {})
    for figure, by_case in throughput.items():
        table.append(Row(f"throughput {figure} Gbit/s", values(by_case, "gbit_s"), 2, AT_LEAST_REDSOCKS))
    for figure, by_case in throughput.items():
        table.append(Row(f"CPU s/GB {figure}", values(by_case, "cpu_s_per_gb"), 2, CPU_PER_GB))
    for figure, by_case in throughput.items():  # every CPU's busy time, softirq included
        table.append(Row(f"machine CPU s/GB {figure}", values(by_case, "machine_cpu_s_per_gb"), 2))
    if short := results.get("short"):
        table += [
            Row("short conn/s", values(short, "conn_per_s"), 0, AT_LEAST_REDSOCKS),
            Row("short p50 ms", values(short, "p50_ms"), 1),
            Row("short p99 ms", values(short, "p99_ms"), 1),
            Row("short CPU ms/1000 conn", values(short, "cpu_ms_per_1000"), 0, CPU_PER_1000_CONN),
        ]
    idle = results.get("idle", {})
    counts = sorted({int(count) for by_count in idle.values() for count in by_count if count.isdigit()})
    for count in counts:
        by_case = {name: by_count.get(str(count), {}) for name, by_count in idle.items()}
        table.append(Row(f"idle KiB/conn @{count}", values(by_case, "kib_per_conn"), 2, IDLE_KIB_PER_CONN))
    return table


def attempt(record: dict, program: str, body: Callable[[], object], setup_errors: tuple[type[Exception], ...]) -> int:
    """Run ``body``, a tool's measuring; a failure goes into record["aborted"], so that what was
    measured until then is still reported. Returns the exit status: 0, 2 for ``setup_errors``, or 1."""
    try:
        body()
    except setup_errors as error:
        record["aborted"] = str(error)
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    except (BenchError, LabError, OSError, subprocess.SubprocessError, KeyboardInterrupt) as error:
        record["aborted"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        return 1
    return 0


def save(kind: str, record: dict) -> None:
    """Write ``record`` to bench/results/KIND-DATE.json, and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\nraw results: {out}{' (partial: ' + record['aborted'] + ')' if 'aborted' in record else ''}")


def number(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def render(results: dict, upstreams: list[str], notes: list[str]) -> tuple[str, dict]:
    """The table as text, and the same figures for the JSON file."""
    lines, as_json = [], {}
    header = (
        f"{'figure':<26}{'routed':>8}{'direct*':>9}{'redsocks':>10}{'relay':>9}"
        f"{'relay/redsocks':>16}  {'target':<9}verdict"
    )
    for upstream in upstreams:
        table = rows(results, upstream)
        as_json[upstream] = [row.as_json() for row in table]
        lines += ["", f"== upstream {upstream} ({UPSTREAM_KINDS[upstream]}) ==", header]
        for row in table:
            v = row.values
            ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
            lines.append(
                f"{row.figure:<26}{number(v['routed'], row.decimals):>8}"
                f"{number(v['direct'], row.decimals):>9}{number(v['redsocks'], row.decimals):>10}"
                f"{number(v['relay'], row.decimals):>9}{ratio:>16}  "
                f"{row.target.text() if row.target else '':<9}{row.verdict}"
            )
    lines += workers_lines(results.get("workers"))
    if notes:
        lines += ["", "notes:", *(f"- {note}" for note in notes)]
    return "\n".join(lines), as_json


def workers_lines(workers: dict | None) -> list[str]:
    if not workers:
        return []
    lines = ["", f"{'relay --workers (short)':<38}{'1 worker':>10}{'2 workers':>11}{'2/1':>8}"]
    for upstream, by_case in workers.items():
        if "skipped" in by_case:
            lines.append(f"{upstream}: skipped, {by_case['skipped']}")
            continue
        for suffix, capped in (("", ""), (CAPPED, f" (capped {WORKER_CAP:g} CPU)")):
            if f"{upstream}/relay-w1{suffix}" not in by_case:
                continue
            one, two = by_case[f"{upstream}/relay-w1{suffix}"], by_case[f"{upstream}/relay-w2{suffix}"]
            for key, label in (("conn_per_s", "conn/s"), ("cpu_ms_per_1000", "CPU ms/1000 conn")):
                ratio = f"{two[key] / one[key]:.2f}x" if one[key] and two[key] is not None else "-"
                lines.append(
                    f"{upstream + ' ' + label + capped:<38}{number(one[key], 0):>10}{number(two[key], 0):>11}{ratio:>8}"
                )
    if any(CAPPED in name for by_case in workers.values() for name in by_case):
        lines.append(
            f"(capped: each relay process may use {WORKER_CAP:g} of one CPU, so that the relay, not the "
            "cores it shares with the rest of the lab, limits the rate)"
        )
    return lines


def spread(runs: list[dict], key: str) -> float:
    values = sorted(run[key] for run in runs if run.get(key))
    return (values[-1] - values[0]) / values[len(values) // 2] if len(values) > 1 else 0.0


def make_notes(results: dict, upstreams: list[str], cpus: int, nofile: int) -> list[str]:
    notes = [
        f"all hosts share this machine's {cpus} CPUs: load generators, servers, proxies and "
        "relays compete for them; CPU figures count only the relay's (or redsocks') own processes"
    ]
    throughput = results.get("throughput", {})
    calibration = [
        (figure, by_case["routed/bulk"]["gbit_s"], by_case["routed"]["gbit_s"])
        for figure, by_case in throughput.items()
        if by_case.get("routed/bulk", {}).get("gbit_s") and by_case.get("routed", {}).get("gbit_s")
    ]
    if calibration:
        notes.append(
            "direct* throughput: iperf3 cannot open a tunnel, so it is benchtool's C bulk client "
            "(128 KiB buffers); on the routed path that client / iperf3 = "
            + ", ".join(f"{figure} {bulk / iperf:.2f}x" for figure, bulk, iperf in calibration)
        )
    short = results.get("short", {})
    routed = short.get("routed", {}).get("conn_per_s")
    relayed = [
        short.get(f"{upstream}/{kind}", {}).get("conn_per_s")
        for upstream in upstreams
        for kind in ("relay", "redsocks")
    ]
    relayed = [rate for rate in relayed if rate]
    if routed and relayed:
        if max(relayed) >= GENERATOR_BOUND * routed:
            notes.append(
                f"short: relayed cases reach {max(relayed) / routed:.0%} of the routed path's "
                f"{routed:.0f} conn/s: the load generator or server may be the bottleneck"
            )
        else:
            notes.append(
                f"short: the load generator does {routed:.0f} conn/s on the routed path, so it is "
                "not what limits the relayed cases (the proxy and the relay share the same CPUs)"
            )
    noisiest = max(((spread(summary["runs"], "conn_per_s"), name) for name, summary in short.items()), default=None)
    if noisiest and noisiest[0] > NOISY_SPREAD:
        notes.append(
            f"short: conn/s varied by up to {noisiest[0]:.0%} of the median between repetitions "
            f"({noisiest[1]}); compare ratios with that in mind"
        )
    failed = sum(summary.get("failed_connections", 0) for summary in short.values())
    if failed:
        notes.append(f"short: {failed} connections failed or did not finish (see the JSON runs)")
    if results.get("idle"):
        notes.append("idle: RSS is user-space memory; kernel socket buffers and pipes are not in it")
    short_of = []
    for name, by_count in results.get("idle", {}).items():
        if "error" in by_count:
            notes.append(f"idle {name}: {by_count['error']}")
            continue
        short_of += [
            f"{name} {run['connections']} of {count}"
            for count, run in by_count.items()
            if run["connections"] < run["wanted"]
        ]
    if short_of:
        notes.append(
            f"idle: only {', '.join(short_of)} were relayed: each process may hold {nofile} fds here, "
            f"a connection takes 2 in the relay and squid, {REDSOCKS_FDS_PER_CONNECTION} in redsocks "
            "(its splice pipes); KiB/conn is per connection reached"
        )
    labelled = [
        (f"throughput {figure} {name}", summary)
        for figure, by_case in throughput.items()
        for name, summary in by_case.items()
    ]
    labelled += [(f"short {name}", summary) for name, summary in short.items()]
    labelled += [
        (f"short {name}", summary)
        for by_case in results.get("workers", {}).values()
        if "skipped" not in by_case
        for name, summary in by_case.items()
    ]
    for label, summary in labelled:
        if errors := [run["error"] for run in summary["runs"] if "error" in run]:
            notes.append(
                f"{label}: {len(errors)} of {len(summary['runs'])} runs failed ({errors[0]}); "
                "the median is of the others"
            )
    return notes
