"""Plain HTTP forwarded in absolute form against the same bytes in a spliced tunnel, and against
squid used directly by the client.

    sudo .venv/bin/python bench/http.py [--size-mib 1024] [--streams 1,8] [--rounds 3]

The lab of bench/run.py (bench/testbed.py): squid on the router, benchtool's HTTP server on the
server, curl on the client. Three ways from client to server:

- ``squid``: curl uses squid itself (``-x``), the reference for throughput;
- ``relay``: curl knows of no proxy; the relay takes its connection (REDIRECT) and forwards each
  request to squid in absolute form, bodies spliced past h11;
- ``tunnel``: the same relay with ``--http-mode connect``: the connection goes through a CONNECT
  tunnel to squid, every byte spliced, the reference for the relay's CPU per GB.

Each run moves ``--size-mib`` in all (split between the streams), downloads (GET) and uploads
(PUT, with a Content-Length); each round runs every way once, in turn. All of them share the
machine's CPUs, unless ``--router-cpu N`` gives the relays a CPU of their own and the rest the others
(as when the router is a machine apart from the client and the proxy), or ``--squid-cpu N`` gives
squid one (as when squid runs on the far host, as deployed). ``--ssh`` puts squid behind ``ssh -L``, as
deployed: the relays and curl reach it through an ssh on the router to an sshd beside squid (with
``--squid-cpu``, on squid's CPU), and read ssh's writes instead of squid's own. squid forwards bodies on one thread,
and the CPU it spends on the same reads and writes (64 KiB each, whichever way) swings 1.5-5 s per
GB from run to run: with every CPU shared, that, not the relay, sets the upload figures.
Reported: throughput,
the relay's CPU seconds per GB moved (its process tree; of it, user time apart: the rest is the
kernel's work in its context, splice and the TCP of what it sends) and the whole machine's
(/proc/stat, softirq included), medians of the rounds, with the targets of issue 20: the relay's CPU per GB
at most 1.2x the tunnel's, throughput at least 0.95x squid's, each the median of the rounds' own ratios
(and their range).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # run as a script from a checkout: import relay from it

from bench.testbed import (  # noqa: E402
    HTTP_PORT,
    SERVER,
    UPSTREAMS,
    Case,
    RelayUnderTest,
    Testbed,
    cannot_run,
    cpu_seconds,
    first_line,
    io_calls,
    machine_busy_seconds,
    process_tree,
    save_results,
)
from relay.lab import ADDR, Lab, start_ssh_tunnel, start_sshd  # noqa: E402

WAYS = ("squid", "relay", "tunnel")
RELAY_ARGS = {"relay": [], "tunnel": ["--http-mode", "connect"]}
RELAY_PORTS = {"relay": 12345, "tunnel": 12346}
RUN_TIMEOUT = 300
SSHD_PORT = 2222
SSH_FORWARD_PORT = 3129  # on the router, loopback and LAN: ssh -L to squid's port


def curl_all(bed: Testbed, way: str, streams: int, size: int, upload: Path | None, squid_port: int) -> None:
    """``streams`` curl processes at once on the client, each moving ``size`` bytes; fails unless all did."""
    proxy = f"-x http://{ADDR.router_lan4}:{squid_port} " if way == "squid" else ""
    if upload is None:
        one = f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}}\\n' {proxy}http://{SERVER}:{HTTP_PORT}/bytes/{size}"
    else:
        one = f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_upload}}\\n' {proxy}-T {upload} http://{SERVER}:{HTTP_PORT}/up"
    script = f"for i in $(seq {streams}); do {one} & done; wait"
    result = bed.lab.run("client", ["sh", "-c", script], check=False, timeout=RUN_TIMEOUT)
    lines = sorted(result.stdout.split("\n")[:-1])
    if lines != [f"200 {size}"] * streams:
        raise RuntimeError(f"{way}: curl said {lines} {result.stderr[-300:]}")


class Squid(NamedTuple):
    """Where curl finds squid when it uses it directly, and the processes of the ssh in between (--ssh):
    ssh on the router, sshd and its session beside squid."""

    port: int
    ssh_pids: list[int]


def one_run(
    bed: Testbed, way: str, case: Case, streams: int, total: int, direction: str, files: dict, squid: Squid
) -> dict:
    size = total // streams
    bed.use(case)
    relay_cpu = case.relay.user_and_kernel_seconds() if case.relay else (0.0, 0.0)
    squid_pids = process_tree(bed.lab.process("squid").pid)
    squid_cpu, squid_io = cpu_seconds(squid_pids), io_calls(squid_pids)
    ssh_cpu = cpu_seconds(squid.ssh_pids)
    busy, started = machine_busy_seconds(), time.monotonic()
    curl_all(bed, way, streams, size, files.get(size) if direction == "up" else None, squid.port)
    seconds = time.monotonic() - started
    gigabytes = size * streams / 1e9
    run = {
        "mbit_s": round(size * streams * 8 / seconds / 1e6, 1),
        "machine_cpu_s_per_gb": round((machine_busy_seconds() - busy) / gigabytes, 3),
        "squid_cpu_s_per_gb": round((cpu_seconds(squid_pids) - squid_cpu) / gigabytes, 3),
    }
    if squid.ssh_pids:
        run["ssh_cpu_s_per_gb"] = round((cpu_seconds(squid.ssh_pids) - ssh_cpu) / gigabytes, 3)
    # squid's CPU per GB follows the size of its reads and writes: a few bytes a call cost as much as many.
    squid_io = {key: value - squid_io[key] for key, value in io_calls(squid_pids).items()}
    run["squid_kib_per_read"] = round(squid_io["rchar"] / max(squid_io["syscr"], 1) / 1024, 1)
    run["squid_kib_per_write"] = round(squid_io["wchar"] / max(squid_io["syscw"], 1) / 1024, 1)
    if case.relay:
        user, kernel = (after - before for after, before in zip(case.relay.user_and_kernel_seconds(), relay_cpu))
        run["relay_cpu_s_per_gb"] = round((user + kernel) / gigabytes, 3)
        run["relay_user_s_per_gb"] = round(user / gigabytes, 3)
    return run


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of ``pids`` onto ``cpu`` (threads they start later inherit it)."""
    for pid in pids:
        for thread in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(thread), {cpu})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes each run moves, in all its streams")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--directions", default="down,up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--squid-line", action="append", default=[], help="a squid.conf line to add (repeatable)")
    parser.add_argument(
        "--router-cpu",
        type=int,
        default=None,
        help="run the relays on this CPU alone and everything else (curl, squid, the server) on the others: "
        "the router as a machine of its own, as deployed, instead of all of them sharing every CPU",
    )
    parser.add_argument(
        "--squid-cpu",
        type=int,
        default=None,
        help="run squid on this CPU alone and everything else (curl, the relays, the server) on the others: "
        "squid on a far host of its own, as deployed",
    )
    parser.add_argument(
        "--ssh",
        action="store_true",
        help="reach squid through ssh -L, as deployed, instead of on the router's loopback",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.router_cpu is not None and args.squid_cpu is not None:
        parser.error("--router-cpu and --squid-cpu each take a CPU for one party: give one of them")
    if why := cannot_run(("squid", "curl", "gcc", *(("sshd", "ssh") if args.ssh else ()))):
        print(f"bench/http.py: {why}", file=sys.stderr)
        return 2
    stream_counts = [int(text) for text in args.streams.split(",")]
    total = args.size_mib << 20
    tests = [(streams, direction) for streams in stream_counts for direction in args.directions.split(",")]
    results: dict = {
        "commit": first_line(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        **{key: getattr(args, key) for key in ("size_mib", "rounds", "squid_line", "router_cpu", "squid_cpu", "ssh")},
        "runs": {f"{streams}x {direction} {way}": [] for streams, direction in tests for way in WAYS},
    }
    apart = args.router_cpu if args.router_cpu is not None else args.squid_cpu
    if apart is not None:
        # Inherited by every process the lab starts from here on; squid or the relays are moved once started.
        os.sched_setaffinity(0, set(range(os.cpu_count())) - {apart})
    with Lab() as lab:
        bed = Testbed(lab, ["squid"], tuple(args.squid_line))
        squid = Squid(UPSTREAMS["squid"][1], [])
        far_side = [lab.process("squid").pid]  # the roots of the far host's process trees
        if args.ssh:
            # sshd on the router stands for the far host's: the same work, one hop less.
            sshd = start_sshd(lab, host="router", port=SSHD_PORT)
            forwards = [
                f"{address}:{SSH_FORWARD_PORT}:127.0.0.1:{squid.port}" for address in ("127.0.0.1", ADDR.router_lan4)
            ]
            start_ssh_tunnel(lab, sshd, forwards=("-L", forwards[0], "-L", forwards[1]))
            # sshd's session exists now: it forked when ssh logged in.
            far_side.append(lab.process("sshd").pid)
            squid = Squid(SSH_FORWARD_PORT, [lab.process("ssh-tunnel").pid, *process_tree(far_side[-1])])
        if args.squid_cpu is not None:
            pin([pid for root in far_side for pid in process_tree(root)], args.squid_cpu)
        if args.router_cpu is not None and args.ssh:
            pin(squid.ssh_pids[:1], args.router_cpu)  # ssh's own end is the router's
        cases = {"squid": Case("squid/direct", "direct", "squid")}
        for way in ("relay", "tunnel"):
            relay = RelayUnderTest(
                bed, "relay", "squid", RELAY_PORTS[way], RELAY_ARGS[way], label=f"relay-{way}", upstream_port=squid.port
            )
            relay.start()
            if args.router_cpu is not None:
                pin(relay.pids(), args.router_cpu)
            cases[way] = Case(f"squid/{way}", "relay", "squid", relay)
        files = {}
        for streams in stream_counts:  # sparse: read as zeros without a disk behind them
            path = lab.tmpdir / f"upload-{streams}.bin"
            with open(path, "wb") as upload:
                upload.truncate(total // streams)
            files[total // streams] = path
        for round_number in range(args.rounds):
            for streams, direction in tests:
                order = WAYS if round_number % 2 == 0 else WAYS[::-1]
                for way in order:
                    run = one_run(bed, way, cases[way], streams, total, direction, files, squid)
                    results["runs"][f"{streams}x {direction} {way}"].append(run)
                    print(f"round {round_number + 1}, {streams}x {direction}, {way}: {run}", flush=True)
    print_table(results, tests)
    save_results(results, "http", args.out)
    return 0


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def paired_ratios(runs: list[dict], baselines: list[dict], key: str) -> str:
    """The median of each round's ratio to the baseline run beside it, and their range: the machine
    drifts by more than the difference between the ways from one minute to the next, and a round's
    ways run within seconds of each other."""
    ratios = sorted(run[key] / baseline[key] for run, baseline in zip(runs, baselines) if baseline[key])
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def print_table(results: dict, tests: list) -> None:
    if results["router_cpu"] is not None:
        print(f"\nthe relays ran on CPU {results['router_cpu']} alone; curl, squid and the server on the others")
    if results["ssh"]:
        print("\nsquid was behind ssh -L, its sshd beside it")
    if results["squid_cpu"] is not None:
        far_side = "squid and sshd" if results["ssh"] else "squid"
        print(f"\n{far_side} ran on CPU {results['squid_cpu']} alone; curl, the relays and the server on the others")
    columns = "Mbit/s (median) | relay CPU s/GB (of it user) | squid CPU s/GB | machine CPU s/GB"
    if results["ssh"]:
        columns += " | ssh and sshd CPU s/GB"
    print(f"\n| test | way | {columns} | targets |")
    print("|---" * (columns.count("|") + 4) + "|")
    for streams, direction in tests:
        runs = {way: results["runs"][f"{streams}x {direction} {way}"] for way in WAYS}
        for way in WAYS:
            rate = median_of(runs[way], "mbit_s")
            relay_cpu = "-"
            if way != "squid":
                user = median_of(runs[way], "relay_user_s_per_gb")
                relay_cpu = f"{median_of(runs[way], 'relay_cpu_s_per_gb')} ({user})"
            note = ""
            if way == "relay":
                throughput = paired_ratios(runs[way], runs["squid"], "mbit_s")
                cpu = paired_ratios(runs[way], runs["tunnel"], "relay_cpu_s_per_gb")
                note = f"{throughput} squid's throughput (≥ 0.95), {cpu} the tunnel's CPU (≤ 1.2)"
            cells = [
                rate,
                relay_cpu,
                median_of(runs[way], "squid_cpu_s_per_gb"),
                median_of(runs[way], "machine_cpu_s_per_gb"),
            ]
            if results["ssh"]:
                cells.append(median_of(runs[way], "ssh_cpu_s_per_gb"))
            print(f"| {streams}x {direction} | {way} | {' | '.join(map(str, cells))} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
