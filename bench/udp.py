"""UDP through dante's UDP ASSOCIATE: relay --udp against redsocks' redudp, in one run.

    sudo .venv/bin/python bench/udp.py [--rates 20,50,100,200,400] [--seconds 3] [--count 1000] [--out FILE]

The lab (relay.lab): client -> router -> far -> server. dante runs on far (UDP ASSOCIATE allowed); the
server runs iperf3 and a UDP echo server; the router reaches the server only through dante. On the
router, either the relay (--mode tproxy --udp on) or redsocks (redudp in TPROXY mode, its redsocks
section carrying TCP) takes the client's traffic, by the same TPROXY rule for UDP (iptables, mangle,
PREROUTING on the LAN interface; iperf3's TCP control connection goes through each one's TCP side).

For each, ``iperf3 -u`` from the client at increasing rates, up (client to server) and down (-R):
throughput the receiver got and loss; then ``--count`` sequential request/response round trips of 64
bytes (a fresh client port, so the first includes opening the association; the median and p99 are of
the rest). The figure that matters: the highest rate with at most 1% loss, and the latency.
Results: JSON in bench/results/, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from relay.lab import ADDR, Lab, start_dante  # noqa: E402
from relay.lab.servers import UdpEchoServer  # noqa: E402
from relay.lab.services import start_relay  # noqa: E402

RESULTS = HERE / "results"
IPERF_PORT = 5201
ECHO_PORT = 7100
RELAY_PORT = 12345
REDSOCKS_TCP_PORT = 12346
REDSOCKS_UDP_PORT = 12347
TPROXY_MARK = "0x1/0x1"
ROUTE_TABLE = "100"
RELAY_MARK = "0x10"
LOSS_TARGET = 1.0  # percent
KINDS = ("relay", "redsocks")


def tproxy_udp(lab: Lab, port: int, action: str = "-A") -> None:
    """The LAN's UDP to ``port`` by TPROXY, with the routing TPROXY needs (IPv4: redudp has no IPv6)."""
    rule = ["-i", ADDR.router_lan_if, "-p", "udp", "-j", "TPROXY", "--on-port", str(port), "--tproxy-mark", TPROXY_MARK]
    lab.run("router", ["iptables", "-w", "-t", "mangle", action, "PREROUTING", *rule])


def tcp_to(lab: Lab, kind: str, action: str = "-A") -> None:
    """The LAN's TCP (iperf3's control connection) to the relay (TPROXY) or redsocks (REDIRECT)."""
    lan = ["-i", ADDR.router_lan_if, "-p", "tcp"]
    if kind == "relay":
        target = ["-t", "mangle", action, "PREROUTING", *lan, "-j", "TPROXY", "--on-port", str(RELAY_PORT)]
        target += ["--tproxy-mark", TPROXY_MARK]
    else:
        target = ["-t", "nat", action, "PREROUTING", *lan, "-j", "REDIRECT", "--to-ports", str(REDSOCKS_TCP_PORT)]
    lab.run("router", ["iptables", "-w", *target])


def redsocks_conf(lab: Lab) -> Path:
    conf = lab.tmpdir / "redsocks-udp.conf"
    conf.write_text(f"""\
base {{
    log_debug = off; log_info = off; daemon = off; redirector = iptables;
}}
redsocks {{
    local_ip = 0.0.0.0; local_port = {REDSOCKS_TCP_PORT};
    ip = {ADDR.far4}; port = 1080; type = socks5;
}}
redudp {{
    local_ip = 0.0.0.0; local_port = {REDSOCKS_UDP_PORT};
    ip = {ADDR.far4}; port = 1080;
    udp_timeout = 30;
}}
""")
    return conf


def start(lab: Lab, kind: str):
    """The relay or redsocks on the router, with its rules; returns a function that stops both."""
    lab.run("router", ["ip", "rule", "add", "fwmark", TPROXY_MARK, "lookup", ROUTE_TABLE])
    lab.run("router", ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", ROUTE_TABLE])
    if kind == "relay":
        args = ["--upstream", f"socks5://{ADDR.far4}:1080", "--mode", "tproxy", "--mark", RELAY_MARK, "--udp", "on"]
        args += ["--listen", f"0.0.0.0:{RELAY_PORT}", "--udp-idle-timeout", "30"]
        relay = start_relay(lab, args, name="relay-udp-bench")
        port, stop_process = RELAY_PORT, relay.stop
    else:
        lab.spawn("router", ["redsocks", "-c", str(redsocks_conf(lab))], name="redsocks-udp-bench")
        lab.wait_tcp("router", "127.0.0.1", REDSOCKS_TCP_PORT, name="redsocks-udp-bench")
        port, stop_process = REDSOCKS_UDP_PORT, lambda: lab.stop("redsocks-udp-bench")
    tproxy_udp(lab, port)
    tcp_to(lab, kind)

    def stop() -> None:
        tproxy_udp(lab, port, "-D")
        tcp_to(lab, kind, "-D")
        stop_process()
        lab.run("router", ["ip", "rule", "del", "fwmark", TPROXY_MARK, "lookup", ROUTE_TABLE], check=False)
        lab.run("router", ["ip", "route", "flush", "table", ROUTE_TABLE], check=False)

    return stop


def iperf_udp(lab: Lab, rate_mbit: int, seconds: float, reverse: bool) -> dict:
    argv = ["iperf3", "-c", ADDR.server4, "-p", str(IPERF_PORT), "-u", "-b", f"{rate_mbit}M", "-t", f"{seconds:g}"]
    argv += ["--json", *(["-R"] if reverse else [])]
    result = lab.run("client", argv, check=False, timeout=seconds + 30)
    try:
        summary = json.loads(result.stdout)["end"]["sum"]
    except (ValueError, KeyError):
        return {"rate_mbit": rate_mbit, "error": (result.stdout + result.stderr).strip()[-300:]}
    return {
        "rate_mbit": rate_mbit,
        "received_mbit": round(summary["bits_per_second"] * (1 - summary["lost_percent"] / 100) / 1e6, 1),
        "loss_percent": round(summary["lost_percent"], 2),
    }


def round_trips(lab: Lab, count: int) -> dict:
    sock = lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    payload = bytes(64)
    times, lost = [], 0
    try:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendto(payload, (ADDR.server4, ECHO_PORT))
            try:
                sock.recvfrom(1024)
            except TimeoutError:
                lost += 1
                continue
            times.append(time.perf_counter() - started)
    finally:
        sock.close()
    if len(times) < 2:
        return {"lost": lost, "error": "no answers"}
    first, rest = times[0], sorted(times[1:])
    return {
        "first_ms": round(first * 1000, 2),
        "median_us": round(statistics.median(rest) * 1e6),
        "p99_us": round(rest[int(len(rest) * 0.99) - 1] * 1e6),
        "lost": lost,
    }


def best_rate(runs: list[dict]) -> float:
    """The most received at or under the loss target: the figure to compare."""
    good = [run["received_mbit"] for run in runs if "loss_percent" in run and run["loss_percent"] <= LOSS_TARGET]
    return max(good, default=0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="20,50,100,200,400", help="iperf3 -b rates, Mbit/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="each iperf3 run")
    parser.add_argument("--count", type=int, default=1000, help="request/response round trips")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default bench/results/udp-DATE.json)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/udp.py: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if missing := [c for c in ("iperf3", "redsocks", "danted") if not shutil.which(c)]:
        print(f"bench/udp.py: missing {', '.join(missing)}; run scripts/setup first", file=sys.stderr)
        return 2
    rates = [int(rate) for rate in args.rates.split(",")]
    record = {"cpus": os.cpu_count(), "seconds": args.seconds, "count": args.count, "results": {}}
    with Lab() as lab:
        start_dante(lab)
        lab.spawn("server", ["iperf3", "-s", "-B", ADDR.server4, "-p", str(IPERF_PORT)], name="iperf3")
        lab.wait_tcp("server", ADDR.server4, IPERF_PORT, name="iperf3")
        UdpEchoServer(lab, "server", ADDR.server4, ECHO_PORT)
        for kind in KINDS:
            stop = start(lab, kind)
            try:
                result = {"latency": round_trips(lab, args.count)}
                for direction, reverse in (("up", False), ("down", True)):
                    result[direction] = [iperf_udp(lab, rate, args.seconds, reverse) for rate in rates]
                    result[f"{direction}_best_mbit"] = best_rate(result[direction])
            finally:
                stop()
            record["results"][kind] = result
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"udp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'':10} {'up best':>9} {'down best':>10} {'rtt median':>11} {'rtt p99':>8} {'first':>8}")
    for kind, result in record["results"].items():
        latency = result["latency"]
        median, p99, first = (latency.get(key, "-") for key in ("median_us", "p99_us", "first_ms"))
        print(
            f"{kind:10} {result['up_best_mbit']:>7} M {result['down_best_mbit']:>8} M "
            f"{median:>8} us {p99:>5} us {first:>5} ms"
        )
        for direction in ("up", "down"):
            cells = ", ".join(
                f"{run['rate_mbit']}M: {run['received_mbit']}M {run['loss_percent']}%"
                if "loss_percent" in run
                else f"{run['rate_mbit']}M: failed"
                for run in result[direction]
            )
            print(f"{'':10} {direction}: {cells}")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
