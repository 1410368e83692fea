"""Interleaved A/B comparison of two versions of relay, in one lab.

    .venv/bin/python bench/ab.py --base HEAD~1 --candidate HEAD
    .venv/bin/python bench/ab.py --base HEAD              # B: this checkout as it is on disk
    .venv/bin/python bench/ab.py --base main --candidate-tree ../other-checkout --tests short --rounds 3

A is --base, a git revision of this repository; B is --candidate, another revision, or
--candidate-tree, a checkout as it is on disk (uncommitted and untracked files included; by default
this checkout). This machine drifts 20-30 % between runs, so both versions run side by side in the
same lab and take turns run for run: in each round every test runs A B B A (B A A B in the next),
so that a drift within a round weighs on both alike.

Each version gets a clean copy in a temporary directory (git archive of the revision; for a tree, the
files git tracks or would track, as they are on disk; never .venv), its Cython extension is built in
place there by this Python (setup.py build_ext --inplace), and its relay runs from there as
`env -i -C COPY PATH=... PYTHONPATH=COPY PYTHON -m relay ...`: the same interpreter and packages for
both, nothing else from the environment. Before anything is measured, that exact command imports
relay, relay._fastpath and every other module of the relay package in the lab's router namespace,
and each must come from the copy's own files; otherwise ab.py stops with exit status 2. (An editable
install's finder, PYTHONPATH or the working directory could otherwise make both sides run the same
code: a copy whose extension did not build would get it from the editable checkout.)

Tests (--tests, default both):
  short     short connections (100 bytes each way, --connections of them, 50 at a time) through
            dante (SOCKS5) and through squid (HTTP CONNECT): conn/s, relay CPU ms per 1000 connections
  download  one iperf3 stream, server to client, through dante for --seconds: Mbit/s, relay CPU s per GB

For every figure: each version's median over the rounds and its spread (min-max), a round's figure
being the mean of that version's two runs in it; B/A, the median of the rounds' ratios, and their
spread; and a verdict. B is called better or worse only when every round's ratio lies on the same
side of 1, which chance alone does 1 time in 2^(rounds-1) (16 with 5 rounds); otherwise "within
spread". --relay-args go to both versions. Everything is written to bench/results/ab-DATE.json.
All traffic stays in the lab: the proxies listen on the router's loopback, the servers on the lab's
own addresses.

The default run (5 rounds, 5000 connections, 10 s downloads) takes about 5 minutes on a 2-core VM;
--rounds 2 --connections 1000 --seconds 3 about 1. Run as root on a machine set up by scripts/setup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import measure
import report
from testbed import UPSTREAMS, BenchError, Case, RelayRejected, RelayUnderTest, Testbed, cannot_run, machine

from relay.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
TESTS = {"short": ("dante", "squid"), "download": ("dante",)}  # test -> upstreams it runs through
NEEDED_COMMANDS = ("git", "tar", "env", "squid", "danted", "iperf3", "gcc", "prlimit", "ss", "iptables")
FIRST_RELAY_PORT = 12345
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOT_COPIED = ":(exclude).venv"  # a pathspec: a virtualenv is no part of a version
BUILD_TIMEOUT_S = 600
FIRM_ROUNDS = 4  # with fewer, chance alone puts every round on one side 1 time in 4 or more
# Run by each version's own relay command: imports every module of its relay package (its
# __main__ would start a relay) and tells where each came from.
WHERE_FROM = """
import importlib, json, pkgutil, sys, relay, relay._fastpath
for module in pkgutil.walk_packages(relay.__path__, "relay."):
    if module.name != "relay.__main__":
        importlib.import_module(module.name)
names = [name for name in sys.modules if name == "relay" or name.startswith("relay.")]
print(json.dumps({name: getattr(sys.modules[name], "__file__", None) for name in names}))
"""


class SetupError(BenchError):
    """A version could not be copied or built, or its relay would not run its own code."""


@dataclass(frozen=True)
class Metric:
    test: str  # "short dante", ...
    key: str  # in each run
    label: str
    scale: float
    decimals: int
    higher_is_better: bool


METRICS = (
    Metric("short dante", "conn_per_s", "short dante conn/s", 1, 0, True),
    Metric("short dante", "cpu_ms_per_1000", "short dante CPU ms/1000 conn", 1, 0, False),
    Metric("short squid", "conn_per_s", "short squid conn/s", 1, 0, True),
    Metric("short squid", "cpu_ms_per_1000", "short squid CPU ms/1000 conn", 1, 0, False),
    Metric("download dante", "gbit_s", "download dante Mbit/s", 1000, 0, True),
    Metric("download dante", "cpu_s_per_gb", "download dante CPU s/GB", 1, 2, False),
)


@dataclass
class Version:
    name: str  # "A" or "B"
    source: str  # the revision or tree as given
    copy: Path
    commit: str = ""
    uncommitted_changes: bool = False
    code_digest: str = ""  # of setup.py and relay/'s sources, to tell when A and B are the same code
    relay_version: str = ""
    modules: dict[str, str] = field(default_factory=dict)

    def python(self) -> list[str]:
        """How this version's Python runs, for its build and its relay: from its copy, nothing else."""
        return ["env", "-i", "-C", str(self.copy), f"PATH={CLEAN_PATH}", f"PYTHONPATH={self.copy}", sys.executable]

    def describe(self) -> str:
        changes = " + uncommitted changes" if self.uncommitted_changes else ""
        return f"{self.name}: {self.source} = {self.commit[:10]}{changes}, {self.relay_version or 'relay ?'}"

    def as_json(self) -> dict:
        return {**self.__dict__, "copy": str(self.copy)}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", default="HEAD", metavar="REV", help="version A, a git revision (default HEAD)")
    candidate = parser.add_mutually_exclusive_group()
    candidate.add_argument("--candidate", metavar="REV", help="version B, a git revision")
    candidate.add_argument(
        "--candidate-tree",
        type=Path,
        default=ROOT,
        metavar="PATH",
        help="version B, a checkout as it is on disk (default: this one)",
    )
    parser.add_argument("--rounds", type=positive, default=5, help="rounds of A B B A (default 5)")
    parser.add_argument(
        "--tests",
        type=lambda text: text.split(","),
        default=list(TESTS),
        metavar="TESTS",
        help=f"comma-separated subset of {','.join(TESTS)} (default: both)",
    )
    parser.add_argument("--connections", type=positive, default=5000, help="per short run (default 5000)")
    parser.add_argument("--seconds", type=positive, default=10, help="per download (default 10)")
    parser.add_argument(
        "--relay-args",
        type=shlex.split,
        default=[],
        metavar="ARGS",
        help='extra arguments for both versions\' relays, e.g. "--pipe-size 262144"',
    )
    args = parser.parse_args()
    if unknown := set(args.tests) - set(TESTS):
        parser.error(f"--tests: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TESTS)}")
    return args


# -- the two copies -------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SetupError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def copy_revision(version: Version) -> None:
    version.commit = git("rev-parse", "--verify", "--end-of-options", f"{version.source}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", version.commit, "--", ".", NOT_COPIED],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(version.copy)], input=archive, capture_output=True, check=True, timeout=120)


def copy_tree(version: Version) -> None:
    tree = Path(git("rev-parse", "--show-toplevel", cwd=Path(version.source)))
    version.commit = git("rev-parse", "HEAD", cwd=tree)
    version.uncommitted_changes = bool(git("status", "--porcelain", "--", ".", NOT_COPIED, cwd=tree))
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", ".", NOT_COPIED, cwd=tree)
    for name in filter(None, listed.split("\0")):
        source = tree / name
        if source.is_symlink() or source.is_file():  # a file deleted but not yet committed is not copied
            (version.copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, version.copy / name, follow_symlinks=False)


def code_digest(copy: Path) -> str:
    digest = hashlib.sha256()
    sources = [path for path in (copy / "relay").rglob("*") if path.suffix in (".py", ".pyx", ".pxd")]
    for path in [copy / "setup.py", *sorted(sources)]:
        digest.update(path.relative_to(copy).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build(version: Version) -> None:
    result = subprocess.run(
        [*version.python(), "setup.py", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise SetupError(
            f"{version.name} ({version.source}): setup.py build_ext --inplace failed (this venv needs Cython "
            f"and setuptools>=77: .venv/bin/pip install -e '.[test]'):\n{output}"
        )


def prepare(args: argparse.Namespace, scratch: Path, versions: list[Version]) -> None:
    """Copies and builds A, then B, adding each to ``versions`` once it is built."""
    base = Version("A", args.base, scratch / "A")
    if args.candidate:
        candidate, copy_candidate = Version("B", args.candidate, scratch / "B"), copy_revision
    else:
        candidate, copy_candidate = Version("B", str(args.candidate_tree.resolve()), scratch / "B"), copy_tree
    for version, copy in ((base, copy_revision), (candidate, copy_candidate)):
        started = time.monotonic()
        version.copy.mkdir()
        copy(version)
        version.code_digest = code_digest(version.copy)
        build(version)
        print(
            f"{version.name}: {version.source} ({version.commit[:10]}) copied to {version.copy} and built "
            f"in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        versions.append(version)


def check_own_code(lab: Lab, version: Version) -> None:
    """In the router namespace, with the relay's exact command: every relay module is the copy's."""
    result = lab.run("router", [*version.python(), "-c", WHERE_FROM], check=False, timeout=60)
    if result.returncode != 0:
        raise SetupError(
            f"{version.name}: its relay cannot import relay, relay._fastpath and every module of its package:\n"
            + "\n".join(result.stderr.splitlines()[-10:])
        )
    modules = json.loads(result.stdout)
    copy = version.copy.resolve()
    strangers = {
        name: path for name, path in modules.items() if not path or not Path(path).resolve().is_relative_to(copy)
    }
    if strangers:
        listed = "\n".join(f"  {name}: {path}" for name, path in sorted(strangers.items()))
        raise SetupError(
            f"{version.name} ({version.source}) would not run its own code: these modules do not come from "
            f"{copy}:\n{listed}\n(look for an editable install's .pth finder, PYTHONPATH, or a build that failed)"
        )
    version.modules = modules
    version.relay_version = lab.run("router", [*version.python(), "-m", "relay", "--version"]).stdout.strip()


# -- the rounds -----------------------------------------------------------------------


def plan(tests: list[str]) -> list[tuple[str, str]]:
    """(test, upstream) in the order each round runs them."""
    return [(test, upstream) for test in TESTS if test in tests for upstream in TESTS[test]]


def start_relays(bed: Testbed, versions: list[Version], upstreams: list[str], relay_args: list[str]) -> dict:
    cases, port = {}, FIRST_RELAY_PORT
    for version in versions:
        for upstream in upstreams:
            relay = RelayUnderTest(
                bed, "relay", upstream, port, relay_args, label=f"{version.name}-{upstream}", python=version.python()
            )
            relay.start()
            cases[version.name, upstream] = Case(f"{upstream}/{version.name}", "relay", upstream, relay)
            port += 1
    return cases


def measure_rounds(
    bed: Testbed, cases: dict, tests: list[str], settings: measure.Settings, rounds: int, runs: dict
) -> None:
    """Fills ``runs``: test -> version -> its runs, each marked with its round."""
    steps = plan(tests)
    progress = measure.Progress(rounds * len(steps) * 4)
    for number in range(rounds):
        order = "ABBA" if number % 2 == 0 else "BAAB"
        for test, upstream in steps:
            figure = f"{test} {upstream}"
            for name in order:
                case = cases[name, upstream]
                label = f"round {number + 1}/{rounds} {figure:<15} {name}"
                try:
                    if test == "short":
                        run = measure.short_run(bed, case, settings)
                        text = measure.describe_short(run)
                    else:
                        run = measure.throughput_run(bed, case, settings.seconds, streams=1, reverse=True)
                        text = measure.describe_throughput(run)
                    progress.report(f"{label}: {text}")
                except BenchError as error:
                    run = {"error": str(error)}
                    progress.report(f"{label}: FAILED {error}")
                runs.setdefault(figure, {"A": [], "B": []})[name].append({"round": number, **run})


# -- the table ------------------------------------------------------------------------


def per_round(runs: list[dict], metric: Metric, rounds: int) -> list[float | None]:
    """A version's figure in each round: the mean of its runs there."""
    figures = []
    for number in range(rounds):
        values = [
            run[metric.key] * metric.scale for run in runs if run["round"] == number and run.get(metric.key) is not None
        ]
        figures.append(statistics.fmean(values) if values else None)
    return figures


def spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def verdict(metric: Metric, ratios: list[float]) -> str:
    if len(ratios) < 2:
        return "n/a: under 2 rounds"
    if min(ratios) <= 1 <= max(ratios):
        return "within spread"
    better = (min(ratios) > 1) == metric.higher_is_better
    weak = f", weak: {len(ratios)} rounds" if len(ratios) < FIRM_ROUNDS else ""
    return f"B {'better' if better else 'worse'} ({statistics.median(ratios) - 1:+.1%}{weak})"


def summarize(runs: dict, rounds: int) -> list[dict]:
    rows = []
    for metric in METRICS:
        if metric.test not in runs:
            continue
        a, b = (per_round(runs[metric.test][name], metric, rounds) for name in "AB")
        ratios = [after / before for before, after in zip(a, b) if before and after is not None]
        rows.append(
            {
                "figure": metric.label,
                "decimals": metric.decimals,
                "A": spread([value for value in a if value is not None]),
                "B": spread([value for value in b if value is not None]),
                "B/A": spread(ratios),
                "verdict": verdict(metric, ratios),
                "rounds": {"A": a, "B": b, "B/A": ratios},
            }
        )
    return rows


def cell(figures: dict | None, decimals: int, suffix: str = "") -> str:
    if figures is None:
        return "-"
    median, low, high = (f"{figures[key]:.{decimals}f}" for key in ("median", "min", "max"))
    return f"{median}{suffix} ({low}-{high})"


def render(rows: list[dict], versions: list[Version], notes: list[str]) -> str:
    lines = [version.describe() for version in versions]
    lines += ["", f"{'figure':<30}{'A median (min-max)':>24}{'B median (min-max)':>24}{'B/A (min-max)':>24}  verdict"]
    for row in rows:
        lines.append(
            f"{row['figure']:<30}{cell(row['A'], row['decimals']):>24}{cell(row['B'], row['decimals']):>24}"
            f"{cell(row['B/A'], 2, 'x'):>24}  {row['verdict']}"
        )
    if notes:
        lines += ["", "notes:", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def make_notes(runs: dict, versions: list[Version], rounds: int, connections: int) -> list[str]:
    if rounds < 2:
        notes = ["one round: a verdict needs two or more"]
    else:
        chance, figures = 1 / 2 ** (rounds - 1), sum(metric.test in runs for metric in METRICS)
        notes = [
            f"{rounds} rounds of A B B A / B A A B; a verdict needs every round's B/A on one side of 1, which "
            f"chance alone does 1 time in {2 ** (rounds - 1)} for each figure, so that with {figures} "
            f"figures {1 - (1 - chance) ** figures:.0%} of runs show at least one verdict by chance"
        ]
    if len(versions) == 2 and versions[0].code_digest == versions[1].code_digest:
        notes.append("A and B have the same setup.py and relay sources: the ratios show only this machine's noise")
    if any(figure.startswith("short") for figure in runs):
        step = 1000 / os.sysconf("SC_CLK_TCK") * 1000 / connections
        notes.append(f"relay CPU is counted in clock ticks: CPU ms/1000 conn moves in steps of {step:.1f}")
    every_run = [run for by_version in runs.values() for version_runs in by_version.values() for run in version_runs]
    if failed := [run["error"] for run in every_run if "error" in run]:
        notes.append(f"{len(failed)} runs failed and are left out; the first: {failed[0]}")
    if unfinished := sum(run.get("errors", 0) + run.get("unfinished", 0) for run in every_run):
        notes.append(f"{unfinished} short connections failed or did not finish (see the JSON runs)")
    return notes


def compare(
    args: argparse.Namespace, settings: measure.Settings, scratch: Path, versions: list[Version], runs: dict
) -> None:
    """Fills ``versions`` as they are built and checked, then ``runs`` round after round."""
    prepare(args, scratch, versions)
    needed = {upstream for test in args.tests for upstream in TESTS[test]}
    upstreams = [name for name in UPSTREAMS if name in needed]
    with Lab() as lab:
        bed = Testbed(lab, upstreams)
        for version in versions:
            check_own_code(lab, version)
            print(f"{version.describe()}: every relay module from {version.copy}", file=sys.stderr)
        cases = start_relays(bed, versions, upstreams, settings.relay_args)
        measure_rounds(bed, cases, args.tests, settings, args.rounds, runs)


def main() -> int:
    args = parse_args()
    if why := cannot_run(NEEDED_COMMANDS):
        print(f"bench/ab.py: {why}", file=sys.stderr)
        return 2
    settings = measure.Settings(seconds=args.seconds, short_count=args.connections, relay_args=args.relay_args)
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "settings": {
            "rounds": args.rounds,
            "tests": args.tests,
            "connections": settings.short_count,
            "concurrency": settings.short_concurrency,
            "seconds": settings.seconds,
            "relay_args": settings.relay_args,
        },
        "machine": machine(),
        "runs": {},
    }
    versions: list[Version] = []
    with tempfile.TemporaryDirectory(prefix="relay-ab-") as scratch:
        status = report.attempt(
            record,
            "bench/ab.py",
            lambda: compare(args, settings, Path(scratch), versions, record["runs"]),
            (SetupError, RelayRejected),
        )
    record["versions"] = {version.name: version.as_json() for version in versions}
    record["summary"] = summarize(record["runs"], args.rounds)
    record["notes"] = make_notes(record["runs"], versions, args.rounds, args.connections)
    if record["runs"]:
        print(render(record["summary"], versions, record["notes"]))
    report.save("ab", record)
    return status


if __name__ == "__main__":
    sys.exit(main())
