"""iperf3 through the relay, against baselines measured in the same run.

Builds the namespace lab (client -> router -> far -> server), runs dante on
far as the SOCKS5 upstream, and measures, for 1 stream in each direction:
  routed        no relay, no proxy: the router forwards packets (the ceiling)
  relay-cython  relay with the Cython splice fast path, via dante
  relay-python  relay with the pure-Python twin (RELAY_NO_EXTENSIONS=1), via dante
and the relay's CPU seconds per GB relayed (user+sys from /proc).

Run as root:  .venv/bin/python bench/throughput.py [--seconds 5] [--repeat 3]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from relay.lab import ADDR, Lab, start_dante
from relay.lab.services import intercept, start_relay

RESULTS = Path(__file__).parent / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(lab: Lab, seconds: int, reverse: bool) -> dict:
    argv = ["iperf3", "-c", ADDR.server4, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    report = json.loads(lab.run("client", argv, timeout=seconds + 30).stdout)
    received = report["end"]["sum_received"]
    return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}


def measure(lab: Lab, seconds: int, repeat: int, relay_pid: int | None) -> dict:
    results = {}
    for direction, reverse in (("upload", False), ("download", True)):
        runs = []
        for _ in range(repeat):
            before = cpu_seconds(relay_pid) if relay_pid else 0.0
            run = iperf(lab, seconds, reverse)
            if relay_pid:
                run["cpu_s_per_gb"] = (cpu_seconds(relay_pid) - before) / (run["bytes"] / 1e9)
            runs.append(run)
            print(f"  {direction}: {run['gbit_s']:.2f} Gbit/s", file=sys.stderr)
        results[direction] = {
            "gbit_s": statistics.median(r["gbit_s"] for r in runs),
            "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in runs) if relay_pid else None,
            "runs": runs,
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/throughput.py: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    results = {}
    with Lab() as lab:
        lab.spawn("server", ["iperf3", "-s", "-B", ADDR.server4], name="iperf3")
        lab.wait_tcp("server", ADDR.server4, 5201, name="iperf3")
        dante = f"socks5://{ADDR.far4}:1080"
        start_dante(lab)

        print("routed (no relay, no proxy)", file=sys.stderr)
        lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        lab.run("far", ["ip", "route", "add", "10.77.1.0/24", "via", ADDR.router_wan4])
        lab.run("router", ["ip", "route", "add", "10.77.3.0/24", "via", ADDR.far4])
        results["routed"] = measure(lab, args.seconds, args.repeat, None)
        lab.run("router", ["ip", "route", "del", "10.77.3.0/24"])

        intercept(lab, "redirect", 12345)
        for name, pure in (("relay-cython", False), ("relay-python", True)):
            print(name, file=sys.stderr)
            relay = start_relay(lab, ["--upstream", dante, "--listen", "0.0.0.0:12345"], name=name, pure=pure)
            results[name] = measure(lab, args.seconds, args.repeat, lab.process(relay.name).pid)
            relay.stop()

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'case':<14} {'dir':<9} {'Gbit/s':>7} {'CPU s/GB':>9} {'vs routed':>10}")
    for case, by_direction in results.items():
        for direction, figures in by_direction.items():
            ratio = figures["gbit_s"] / results["routed"][direction]["gbit_s"]
            cpu = f"{figures['cpu_s_per_gb']:.2f}" if figures["cpu_s_per_gb"] is not None else "-"
            print(f"{case:<14} {direction:<9} {figures['gbit_s']:>7.2f} {cpu:>9} {ratio:>9.2f}x")
    for direction in ("upload", "download"):
        fast, pure = results["relay-cython"][direction], results["relay-python"][direction]
        print(
            f"cython/python {direction}: throughput {fast['gbit_s'] / pure['gbit_s']:.2f}x, "
            f"CPU per GB {fast['cpu_s_per_gb'] / pure['cpu_s_per_gb']:.2f}x"
        )
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
