"""Throughput of many streams through the relay's own ssh tunnel: one ssh process against several.

    sudo .venv/bin/python bench/lanes.py [--rtt-ms 100] [--streams 8] [--size-mib 64] [--rounds 3] [--lanes 1,2]

Everything the LAN sends through ``--ssh`` crosses one ssh TCP connection, encrypted by one ssh
process on one core; ``--ssh-connections N`` makes it N. The lab (relay.lab): the relay on the
router runs its ssh to far's sshd across a delay line (relay/lab/delayline.py, --rtt-ms), squid
on far's loopback behind it. The client downloads ``--streams`` files of ``--size-mib`` at once
from the server's traffic server, through the relay; each round measures every lane count once,
in turn (A B, then B A), and the table gives the median of the rounds. Also reports the whole
machine's busy CPU (/proc/stat, softirq included) per GB moved.
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

from bench.dnsload import machine_ticks  # noqa: E402
from bench.testbed import cannot_run, first_line, save_results  # noqa: E402
from relay.lab import ADDR, Lab, sshd_across_delay_line, start_squid, start_sshd  # noqa: E402
from relay.lab.servers import TrafficServer, pattern_sha256  # noqa: E402
from relay.lab.services import clear_interception, intercept, start_relay  # noqa: E402

SSH_LINE_PORT = 7101
RELAY_PORT = 12345
TRAFFIC_PORT = 7000
IO_TIMEOUT = 120.0


def machine_busy_seconds() -> float:
    """All CPUs' non-idle time so far (softirq included), in seconds."""
    return machine_ticks()[0] / os.sysconf("SC_CLK_TCK")


def download(lab: Lab, size: int, seed: int, errors: list) -> None:
    try:
        with lab.connect("client", ADDR.server4, TRAFFIC_PORT, timeout=IO_TIMEOUT) as sock:
            sock.sendall(f"DOWN {size} {seed}\n".encode())
            digest, received = hashlib.sha256(), 0
            while data := sock.recv(1 << 20):
                digest.update(data)
                received += len(data)
        if received != size or digest.hexdigest() != pattern_sha256(size, seed):
            errors.append(f"stream {seed}: {received} bytes, sha256 mismatch or short")
    except OSError as exc:
        errors.append(f"stream {seed}: {exc}")


def one_run(lab: Lab, streams: int, size: int) -> dict:
    errors: list[str] = []
    threads = [threading.Thread(target=download, args=(lab, size, seed, errors)) for seed in range(streams)]
    busy, started = machine_busy_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT)
    seconds, busy = time.monotonic() - started, machine_busy_seconds() - busy
    if errors:
        raise RuntimeError("; ".join(errors))
    moved = streams * size
    return {"mbit_s": round(moved * 8 / seconds / 1e6, 1), "machine_cpu_s_per_gb": round(busy / (moved / 1e9), 2)}


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
    }
    with Lab() as lab:
        sshd = start_sshd(lab)
        start_squid(lab, listen=[("127.0.0.1", 3128)])
        delayed, _ = sshd_across_delay_line(lab, sshd, SSH_LINE_PORT, args.rtt_ms / 2)
        TrafficServer(lab, "server", "0.0.0.0", TRAFFIC_PORT)
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
                    run = one_run(lab, args.streams, args.size_mib << 20)
                finally:
                    clear_interception(lab)
                    relay.stop()
                results["runs"][str(lanes)].append(run)
                print(f"round {round_number + 1}, {lanes} ssh: {run}", flush=True)
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
    save_results(results, "lanes", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
