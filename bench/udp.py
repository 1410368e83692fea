"""UDP through dante's UDP ASSOCIATE: relay --udp against redsocks' redudp, in one run.

    sudo .venv/bin/python bench/udp.py [--rounds 3] [--rates 20,50,100,200,400] [--seconds 3] [--count 1000]

The lab (relay.lab): client -> router -> far -> server. dante runs on far (UDP ASSOCIATE allowed); the
server runs iperf3 and a UDP echo server; the router reaches the server only through dante. On the
router, either the relay (--mode tproxy --udp on) or redsocks (redudp in TPROXY mode, its redsocks
section carrying TCP) takes the client's traffic, by the same TPROXY rule for UDP (iptables, mangle,
PREROUTING on the LAN interface; iperf3's TCP control connection goes through each one's TCP side).

For each, ``iperf3 -u`` from the client at increasing rates, up (client to server) and down (-R):
throughput the receiver got and loss. Then latency, with both running at once, each taking the
datagrams to its own echo port: ``--count`` request/response round trips of 64 bytes through one and
then the other, in turn (a fresh client port each; the median and p99 leave out the first, which
opens the association), so that the machine's drift falls on both alike; then ``--new-ports`` new
client ports through each in turn, each timed to its first answer ("first": each opens an
association, the relay's on a pre-opened connection when its pool has one; "very first" is the
first of all, from a relay just started). The figures that matter: the highest rate with at most
1% loss, and the latency. ``--rounds`` rounds (the one measured first alternates); each figure is
the median of the rounds, each ratio the median of the rounds' relay/redsocks ratios.
``--control-rtt-ms`` puts a TCP delay line (relay/lab/delayline.py) on the router in front of
dante's TCP port, so the associations' control connections pay a far link's round trips (the
datagrams do not). Results: JSON in bench/results/, and a table on stdout.
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
from relay.lab.services import start_delay_line, start_relay  # noqa: E402

RESULTS = HERE / "results"
IPERF_PORT = 5201
ECHO_PORT = 7100
ECHO_PORTS = {"relay": ECHO_PORT, "redsocks": ECHO_PORT + 1}  # the latency's: both run at once
RELAY_PORT = 12345
REDSOCKS_TCP_PORT = 12346
REDSOCKS_UDP_PORT = 12347
TPROXY_MARK = "0x1/0x1"
ROUTE_TABLE = "100"
RELAY_MARK = "0x10"
LOSS_TARGET = 1.0  # percent
KINDS = ("relay", "redsocks")
# Where both reach dante for TCP (their control connections): dante itself, or, with --control-rtt-ms, a
# delay line on the router in front of it (the datagrams go straight to the relay address dante names).
SOCKS = [ADDR.far4, 1080]
CONTROL_LINE = ("127.0.0.1", 1090)


def tproxy_udp(lab: Lab, port: int, action: str = "-A", echo_port: int | None = None) -> None:
    """The LAN's UDP (to ``echo_port`` only, if given) to ``port`` by TPROXY (IPv4: redudp has no IPv6)."""
    match = ["-i", ADDR.router_lan_if, "-p", "udp", *(["--dport", str(echo_port)] if echo_port else [])]
    rule = [*match, "-j", "TPROXY", "--on-port", str(port), "--tproxy-mark", TPROXY_MARK]
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
    ip = {SOCKS[0]}; port = {SOCKS[1]}; type = socks5;
}}
redudp {{
    local_ip = 0.0.0.0; local_port = {REDSOCKS_UDP_PORT};
    ip = {SOCKS[0]}; port = {SOCKS[1]};
    udp_timeout = 30;
}}
""")
    return conf


def route_tproxy(lab: Lab, action: str = "add") -> None:
    """The routing TPROXY needs: marked packets delivered locally."""
    if action == "add":
        lab.run("router", ["ip", "rule", "add", "fwmark", TPROXY_MARK, "lookup", ROUTE_TABLE])
        lab.run("router", ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", ROUTE_TABLE])
    else:
        lab.run("router", ["ip", "rule", "del", "fwmark", TPROXY_MARK, "lookup", ROUTE_TABLE], check=False)
        lab.run("router", ["ip", "route", "flush", "table", ROUTE_TABLE], check=False)


def start_process(lab: Lab, kind: str):
    """The relay or redsocks on the router; returns (its UDP port, a function that stops it)."""
    if kind == "relay":
        upstream = f"socks5://{SOCKS[0]}:{SOCKS[1]}"
        args = ["--upstream", upstream, "--mode", "tproxy", "--mark", RELAY_MARK, "--udp", "on"]
        args += ["--listen", f"0.0.0.0:{RELAY_PORT}", "--udp-idle-timeout", "30"]
        return RELAY_PORT, start_relay(lab, args, name="relay-udp-bench").stop
    lab.spawn("router", ["redsocks", "-c", str(redsocks_conf(lab))], name="redsocks-udp-bench")
    lab.wait_tcp("router", "127.0.0.1", REDSOCKS_TCP_PORT, name="redsocks-udp-bench")
    return REDSOCKS_UDP_PORT, lambda: lab.stop("redsocks-udp-bench")


def start(lab: Lab, kind: str):
    """The relay or redsocks with its rules for all the LAN's UDP and TCP; returns a function that stops both."""
    route_tproxy(lab)
    port, stop_process = start_process(lab, kind)
    tproxy_udp(lab, port)
    tcp_to(lab, kind)

    def stop() -> None:
        tproxy_udp(lab, port, "-D")
        tcp_to(lab, kind, "-D")
        stop_process()
        route_tproxy(lab, "del")

    return stop


def paired_latency(lab: Lab, count: int, new_ports: int) -> dict:
    """Both at once, each taking the datagrams to its own echo port, round trips through them in turn:
    the pairs are measured within a millisecond of each other, so the machine's drift cancels out."""
    route_tproxy(lab)
    started = []
    try:
        for kind in KINDS:
            port, stop_process = start_process(lab, kind)
            started.append(stop_process)
            tproxy_udp(lab, port, echo_port=ECHO_PORTS[kind])
            started.append(lambda port=port, kind=kind: tproxy_udp(lab, port, "-D", echo_port=ECHO_PORTS[kind]))
        return round_trips(lab, count, new_ports)
    finally:
        for stop in reversed(started):
            stop()
        route_tproxy(lab, "del")


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


def first_round_trips(lab: Lab, count: int) -> dict[str, list[float]]:
    """The first round trip of ``count`` new client ports through each, in turn: each opens an association."""
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(count):
        for kind in KINDS:
            with lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2.0)
                started = time.perf_counter()
                sock.sendto(bytes(64), (ADDR.server4, ECHO_PORTS[kind]))
                try:
                    sock.recvfrom(1024)
                except TimeoutError:
                    continue
                times[kind].append(time.perf_counter() - started)
    return times


def round_trips(lab: Lab, count: int, new_ports: int) -> dict:
    """``count`` round trips of 64 bytes through each, in turn, each from its own client port; then the first
    round trips of ``new_ports`` new client ports."""
    socks = {kind: lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) for kind in KINDS}
    payload = bytes(64)
    times = {kind: [] for kind in KINDS}
    lost = dict.fromkeys(KINDS, 0)
    try:
        for sock in socks.values():
            sock.settimeout(2.0)
        for _ in range(count):
            for kind, sock in socks.items():
                started = time.perf_counter()
                sock.sendto(payload, (ADDR.server4, ECHO_PORTS[kind]))
                try:
                    sock.recvfrom(1024)
                except TimeoutError:
                    lost[kind] += 1
                    continue
                times[kind].append(time.perf_counter() - started)
    finally:
        for sock in socks.values():
            sock.close()
    firsts = first_round_trips(lab, new_ports)
    result = {}
    for kind in KINDS:
        if len(times[kind]) < 2 or not firsts[kind]:
            result[kind] = {"lost": lost[kind], "error": "no answers"}
            continue
        rest = sorted(times[kind][1:])
        result[kind] = {
            "first_ms": round(statistics.median(firsts[kind]) * 1000, 2),
            "very_first_ms": round(times[kind][0] * 1000, 2),
            "median_us": round(statistics.median(rest) * 1e6),
            "p99_us": round(rest[int(len(rest) * 0.99) - 1] * 1e6),
            "lost": lost[kind],
        }
    return result


def best_rate(runs: list[dict]) -> float:
    """The most received at or under the loss target: the figure to compare."""
    good = [run["received_mbit"] for run in runs if "loss_percent" in run and run["loss_percent"] <= LOSS_TARGET]
    return max(good, default=0.0)


def throughput(lab: Lab, kind: str, args, rates: list[int]) -> dict:
    stop = start(lab, kind)
    try:
        result = {}
        for direction, reverse in (("up", False), ("down", True)):
            result[direction] = [iperf_udp(lab, rate, args.seconds, reverse) for rate in rates]
            result[f"{direction}_best_mbit"] = best_rate(result[direction])
    finally:
        stop()
    return result


FIGURES = {  # name in the table: how to read it from one round's result
    "up best Mbit/s": lambda result: result["up_best_mbit"],
    "down best Mbit/s": lambda result: result["down_best_mbit"],
    "rtt median us": lambda result: result["latency"].get("median_us"),
    "rtt p99 us": lambda result: result["latency"].get("p99_us"),
    "first ms (new port)": lambda result: result["latency"].get("first_ms"),
    "very first ms": lambda result: result["latency"].get("very_first_ms"),
}


def loss_at(direction: str, rate: int):
    def read(result: dict):
        return next((run.get("loss_percent") for run in result[direction] if run["rate_mbit"] == rate), None)

    return read


def summary(rounds: list[dict], rates: list[int]) -> dict:
    """Each figure's median over the rounds for both, and the median of the rounds' relay/redsocks ratios."""
    table = {}
    losses = {f"{way} loss % at {rate}M": loss_at(way, rate) for way in ("up", "down") for rate in rates}
    for name, read in {**FIGURES, **losses}.items():
        row = {}
        for kind in KINDS:
            values = [read(one[kind]) for one in rounds if read(one[kind]) is not None]
            row[kind] = statistics.median(values) if values else None
        ratios = [
            read(one["relay"]) / read(one["redsocks"])
            for one in rounds
            if name in FIGURES and read(one["relay"]) is not None and read(one["redsocks"])
        ]
        row["ratio"] = round(statistics.median(ratios), 2) if ratios else None
        row["ratios"] = [round(ratio, 2) for ratio in ratios]
        table[name] = row
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, relay and redsocks in turn in each")
    parser.add_argument("--rates", default="20,50,100,200,400", help="iperf3 -b rates, Mbit/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="each iperf3 run")
    parser.add_argument("--count", type=int, default=1000, help="request/response round trips")
    parser.add_argument("--new-ports", type=int, default=50, help="new client ports, each timed to its first answer")
    parser.add_argument(
        "--control-rtt-ms",
        type=float,
        default=0.0,
        help="a round trip added to the TCP control connections to dante by a delay line (default: none)",
    )
    parser.add_argument("--out", type=Path, help="where the JSON goes (default bench/results/udp-DATE.json)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/udp.py: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if missing := [c for c in ("iperf3", "redsocks", "danted") if not shutil.which(c)]:
        print(f"bench/udp.py: missing {', '.join(missing)}; run scripts/setup first", file=sys.stderr)
        return 2
    rates = [int(rate) for rate in args.rates.split(",")]
    record = {"cpus": os.cpu_count(), "seconds": args.seconds, "count": args.count, "rounds": []}
    record["control_rtt_ms"] = args.control_rtt_ms
    with Lab() as lab:
        start_dante(lab)
        lab.spawn("server", ["iperf3", "-s", "-B", ADDR.server4, "-p", str(IPERF_PORT)], name="iperf3")
        lab.wait_tcp("server", ADDR.server4, IPERF_PORT, name="iperf3")
        UdpEchoServer(lab, "server", ADDR.server4, ECHO_PORT)
        UdpEchoServer(lab, "server", ADDR.server4, ECHO_PORTS["redsocks"])
        if args.control_rtt_ms:
            start_delay_line(lab, CONTROL_LINE, tuple(SOCKS), args.control_rtt_ms / 2, name="control-delay-line")
            SOCKS[:] = CONTROL_LINE
        for number in range(args.rounds):
            order = KINDS if number % 2 == 0 else KINDS[::-1]
            one = {kind: throughput(lab, kind, args, rates) for kind in order}
            for kind, latency in paired_latency(lab, args.count, args.new_ports).items():
                one[kind]["latency"] = latency
            record["rounds"].append(one)
    record["summary"] = summary(record["rounds"], rates)
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"udp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'median of ' + str(args.rounds) + ' rounds':24} {'relay':>9} {'redsocks':>9} {'relay/redsocks':>15}")
    for name, row in record["summary"].items():
        cells = [f"{row[kind]:>9g}" if row[kind] is not None else f"{'-':>9}" for kind in KINDS]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        rounds = f"  rounds: {row['ratios']}" if row["ratios"] else ""
        print(f"{name:24} {' '.join(cells)} {ratio:>15}{rounds}")
    for number, one in enumerate(record["rounds"], 1):
        for kind, result in one.items():
            for direction in ("up", "down"):
                cells = ", ".join(
                    f"{run['rate_mbit']}M: {run['received_mbit']}M {run['loss_percent']}%"
                    if "loss_percent" in run
                    else f"{run['rate_mbit']}M: failed"
                    for run in result[direction]
                )
                print(f"round {number} {kind:9} {direction:>4}: {cells}")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
