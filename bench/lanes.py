"""Throughput of many streams through the relay's own ssh tunnel: one ssh process against several.

    sudo .venv/bin/python bench/lanes.py [--rtt-ms 100] [--streams 8] [--size-mib 64] [--rounds 3] [--lanes 1,2]

Everything the LAN sends through ``--ssh`` crosses one ssh TCP connection, encrypted by one ssh
process on one core; ``--ssh-connections N`` makes it N. The lab (relay.lab): the relay on the
router runs its ssh to far's sshd across a delay line (relay/lab/delayline.py, --rtt-ms), squid
on far's loopback behind it. The client downloads ``--streams`` files of ``--size-mib`` at once
from the server's traffic server, through the relay; each round measures every lane count once,
in turn (A B, then B A), and the table gives the median of the rounds. Also reports the whole
machine's busy CPU (/proc/stat, softirq included) per GB moved, and how much of it each process of the
lab (and the clients, this process) took: the rest is softirq and whatever else ran meanwhile.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # run as a script from a checkout: import relay from it

from bench.testbed import cannot_run, first_line, machine_busy_seconds, save_results  # noqa: E402
from relay.lab import ADDR, HOSTS, Lab, sshd_across_delay_line, start_squid, start_sshd  # noqa: E402
from relay.lab.servers import TrafficServer  # noqa: E402
from relay.lab.services import clear_interception, intercept, start_relay  # noqa: E402

SSH_LINE_PORT = 7101
RELAY_PORT = 12345
TRAFFIC_PORT = 7000
IO_TIMEOUT = 120.0


def softirq_seconds() -> float:
    """All CPUs' softirq time so far: the network's receive path, mostly (/proc/stat)."""
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[7]) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    """A process's program, or for Python the module or script it runs (relay, relay.lab.delayline...)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    program = Path(argv[0]).name
    if program.startswith("python"):
        rest = argv[1:]
        if "-m" in rest:
            return rest[rest.index("-m") + 1]
        if rest and rest[0]:
            return Path(rest[0]).name
    return program


def process_seconds(lab: Lab) -> dict[str, float]:
    """CPU seconds so far (user + system) of every process in the lab, by host and program, and of
    this one, whose threads are the clients."""
    ticks = os.sysconf("SC_CLK_TCK")
    owners = [(host, pid) for host in HOSTS for pid in lab.pids(host)] + [("client", os.getpid())]
    seconds: dict[str, float] = {}
    for host, pid in owners:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            name = f"{host} {'bench clients' if pid == os.getpid() else process_name(pid)}"
        except (OSError, IndexError):
            continue  # gone meanwhile
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def download(lab: Lab, size: int, seed: int, expected: str, errors: list) -> None:
    try:
        with lab.connect("client", ADDR.server4, TRAFFIC_PORT, timeout=IO_TIMEOUT) as sock:
            sock.sendall(f"DOWN {size} {seed}\n".encode())
            digest, received = hashlib.sha256(), 0
            while data := sock.recv(1 << 20):
                digest.update(data)
                received += len(data)
        if received != size or digest.hexdigest() != expected:
            errors.append(f"stream {seed}: {received} bytes, sha256 mismatch or short")
    except OSError as exc:
        errors.append(f"stream {seed}: {exc}")


def one_run(lab: Lab, size: int, digests: list[str]) -> dict:
    errors: list[str] = []
    threads = [
        threading.Thread(target=download, args=(lab, size, seed, expected, errors))
        for seed, expected in enumerate(digests)
    ]
    per_process, softirq = process_seconds(lab), softirq_seconds()
    busy, started = machine_busy_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT)
    seconds, busy = time.monotonic() - started, machine_busy_seconds() - busy
    softirq = softirq_seconds() - softirq
    if errors:
        raise RuntimeError("; ".join(errors))
    moved = len(digests) * size
    after = process_seconds(lab)
    spent = {name: after[name] - per_process.get(name, 0.0) for name in after}
    # A process is charged with the softirq work done while it ran (tick accounting); the rest is
    # softirq elsewhere (ksoftirqd, idle CPUs) and whatever else ran on the machine meanwhile.
    spent["rest of the machine"] = busy - sum(spent.values())
    return {
        "mbit_s": round(moved * 8 / seconds / 1e6, 1),
        "machine_cpu_s_per_gb": round(busy / (moved / 1e9), 2),
        "softirq_s_per_gb": round(softirq / (moved / 1e9), 2),
        "cpu_s_per_gb": {
            name: round(value / (moved / 1e9), 2)
            for name, value in sorted(spent.items(), key=lambda item: -item[1])
            if value / (moved / 1e9) >= 0.1
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lanes", default="1,2", help="ssh connections to compare, e.g. 1,2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if why := cannot_run(("squid", "sshd", "ssh")):
        print(f"bench/lanes.py: {why}", file=sys.stderr)
        return 2
    lane_counts = [int(text) for text in args.lanes.split(",")]
    results: dict = {
        "commit": first_line(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        **{key: getattr(args, key) for key in ("rtt_ms", "streams", "size_mib", "rounds")},
        "runs": {str(lanes): [] for lanes in lane_counts},
        # Others' work on the machine shows in its CPU figures: the load before and after says how much.
        "load_average_before": os.getloadavg(),
    }
    with Lab() as lab:
        sshd = start_sshd(lab)
        start_squid(lab, listen=[("127.0.0.1", 3128)])
        delayed, _ = sshd_across_delay_line(lab, sshd, SSH_LINE_PORT, args.rtt_ms / 2)
        server = TrafficServer(lab, "server", "0.0.0.0", TRAFFIC_PORT)
        # Made beforehand: the clients and the server (threads of this process) then cost the
        # machine only their sockets and the clients' sha256, not making the pattern twice.
        digests = [server.preload(args.size_mib << 20, seed) for seed in range(args.streams)]
        for round_number in range(args.rounds):
            order = lane_counts if round_number % 2 == 0 else lane_counts[::-1]
            for lanes in order:
                relay = start_relay(
                    lab,
                    [
                        *("--upstream", "127.0.0.1:3128", "--listen", f"0.0.0.0:{RELAY_PORT}"),
                        *("--ssh", f"root@127.0.0.1:{SSH_LINE_PORT}", "--ssh-identity", str(delayed.client_key)),
                        *("--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null"),
                        *("--ssh-connections", str(lanes), "--preconnect", "off"),
                    ],
                    name=f"relay-{lanes}-{round_number}",
                )
                intercept(lab, "redirect", RELAY_PORT)
                try:
                    time.sleep(1)  # every ssh logged in
                    run = one_run(lab, args.size_mib << 20, digests)
                finally:
                    clear_interception(lab)
                    relay.stop()
                results["runs"][str(lanes)].append(run)
                print(f"round {round_number + 1}, {lanes} ssh: {run}", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"\nload average before {results['load_average_before']}, after {results['load_average_after']}")
    print(f"\n| ssh connections | {args.streams} streams Mbit/s (median) | machine CPU s/GB | vs 1 |")
    print("|---|---|---|---|")
    base = statistics.median(run["mbit_s"] for run in results["runs"][str(lane_counts[0])])
    for lanes in lane_counts:
        runs = results["runs"][str(lanes)]
        rate = statistics.median(run["mbit_s"] for run in runs)
        cpu = statistics.median(run["machine_cpu_s_per_gb"] for run in runs)
        print(
            f"| {lanes} | {rate} ({min(r['mbit_s'] for r in runs)}-{max(r['mbit_s'] for r in runs)}) | {cpu} | "
            f"{rate / base:.2f}x |"
        )
    print("\nCPU s/GB by process (median of the rounds; the clients are this process's threads):")
    for lanes in lane_counts:
        runs = results["runs"][str(lanes)]
        names = {name for run in runs for name in run["cpu_s_per_gb"]}
        medians = {name: statistics.median(run["cpu_s_per_gb"].get(name, 0.0) for run in runs) for name in names}
        shares = ", ".join(f"{name} {value:g}" for name, value in sorted(medians.items(), key=lambda item: -item[1]))
        print(f"- {lanes} ssh: {shares}")
    save_results(results, "lanes", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
