"""A bounded DNS load generator: UDP queries made with dnspython, CONCURRENCY at a time, for SECONDS
(or until COUNT queries were sent), then it waits for the last answers (at most TIMEOUT) and prints
one JSON object: queries, answered, timeouts, bad answers by reason, qps, p50/p99/max latency in ms,
and, over the timed part alone (not its start-up), its own CPU seconds (load_cpu_s) and the whole
machine's share of busy CPU time (machine_busy, from /proc/stat, which every namespace shares).

    python bench/dnsload.py --server 10.77.1.1:53 --zone bench.example. --hit-names 200 --seconds 5
    python bench/dnsload.py --server 10.77.1.1:53 --zone bench.example. --miss --seconds 5

--hit-names N asks h0.ZONE .. h(N-1).ZONE over and over (cache hits once each was asked);
--miss asks a name never asked before every time (mINDEX-RUNTOKEN.ZONE), so each one goes to the
far resolver. Each worker is one query in flight at a time (closed loop), sending from the
--sources addresses in turn, one UDP socket per address (the relay limits queries per source).
An answer counts when its ID, question and RCODE (NOERROR) match and it has an answer record;
one in SAMPLE_EVERY is also parsed whole by dnspython and must hold --expect. Used by bench/dns.py
in the client namespace.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import secrets
import sys
import time
from collections import Counter

import dns.message
import dns.rdatatype
import trio

SAMPLE_EVERY = 64
RECEIVE_SIZE = 4096


def endpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=endpoint, required=True, metavar="ADDR:PORT")
    parser.add_argument("--zone", required=True, help="the names' zone, e.g. bench.example.")
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--hit-names", type=int, metavar="N", help="ask h0..h(N-1) in the zone, over and over")
    names.add_argument("--miss", action="store_true", help="ask a new name every time")
    parser.add_argument("--expect", help="the A record every answer must hold (checked on a sample)")
    parser.add_argument("--sources", default="", help="comma-separated source addresses (default: the kernel's)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0, help="stop after this many queries (0: no limit)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds before a query counts as lost")
    return parser.parse_args(argv)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        zone = args.zone if args.zone.endswith(".") else args.zone + "."
        self.zone = zone
        self.token = secrets.token_hex(4)  # this run's: no name is asked twice across runs
        if args.hit_names:
            self.pool = [dns.message.make_query(f"h{n}.{zone}", "A").to_wire() for n in range(args.hit_names)]
        self.sent = 0
        self.answered = 0
        self.timeouts = 0
        self.bad: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.last_answer = 0.0

    def next_query(self) -> bytes:
        number = self.sent
        self.sent += 1
        if self.args.miss:
            return dns.message.make_query(f"m{number}-{self.token}.{self.zone}", "A").to_wire()
        wire = self.pool[number % len(self.pool)]
        return random.getrandbits(16).to_bytes(2, "big") + wire[2:]

    def check(self, query: bytes, reply: bytes) -> str | None:
        """Why ``reply`` is not a good answer to ``query``, or None."""
        if len(reply) < len(query) or not reply[2] & 0x80:
            return "not-a-response"
        if reply[2] & 0x02:
            return "truncated"
        if rcode := reply[3] & 0x0F:
            return f"rcode-{rcode}"
        if reply[12 : len(query)].lower() != query[12:].lower():  # no EDNS: the query is header + question
            return "other-question"
        if reply[6:8] == b"\0\0":
            return "no-answer"
        if self.args.expect and self.answered % SAMPLE_EVERY == 0:
            parsed = dns.message.from_wire(reply)
            found = {rdata.address for rrset in parsed.answer if rrset.rdtype == dns.rdatatype.A for rdata in rrset}
            if self.args.expect not in found:
                return "wrong-address"
        return None

    async def worker(self, sockets: list, deadline: float) -> None:
        turn = 0
        while trio.current_time() < deadline and not (self.args.count and self.sent >= self.args.count):
            sock = sockets[turn % len(sockets)]
            turn += 1
            query = self.next_query()
            started = time.perf_counter()
            await sock.send(query)
            reply = None
            with trio.move_on_after(self.args.timeout):
                while True:
                    reply = await sock.recv(RECEIVE_SIZE)
                    if reply[:2] == query[:2]:
                        break  # anything else is late, for a query given up on
            if reply is None or reply[:2] != query[:2]:
                self.timeouts += 1
                continue
            if why := self.check(query, reply):
                self.bad[why] += 1
                continue
            now = time.perf_counter()
            self.latencies.append(now - started)
            self.answered += 1
            self.last_answer = now

    async def run(self) -> dict:
        sources = [source for source in self.args.sources.split(",") if source] or [""]
        workers = []
        for number in range(self.args.concurrency):
            mine = sources[number :: self.args.concurrency] or [sources[number % len(sources)]]
            sockets = []
            for source in mine:
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                await sock.bind((source, 0))
                await sock.connect(self.args.server)
                sockets.append(sock)
            workers.append(sockets)
        started, cpu_before, machine_before = time.perf_counter(), own_cpu(), machine_ticks()
        deadline = trio.current_time() + self.args.seconds
        async with trio.open_nursery() as nursery:
            for sockets in workers:
                nursery.start_soon(self.worker, sockets, deadline)
        for sockets in workers:
            for sock in sockets:
                sock.close()
        busy, total = (after - before for after, before in zip(machine_ticks(), machine_before))
        return {
            **self.summary(max(self.last_answer, started + 1e-9) - started),
            "load_cpu_s": own_cpu() - cpu_before,
            "machine_busy": busy / max(1, total),
        }

    def summary(self, seconds: float) -> dict:
        ordered = sorted(self.latencies)

        def percentile(share: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else None

        return {
            "queries": self.sent,
            "answered": self.answered,
            "timeouts": self.timeouts,
            "bad": dict(self.bad),
            "seconds": seconds,
            "qps": self.answered / seconds if self.answered else 0.0,
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
            "max_ms": ordered[-1] * 1000 if ordered else None,
        }


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU so far, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def main() -> None:
    args = parse_args()
    print(json.dumps(trio.run(Load(args).run)))


if __name__ == "__main__":
    sys.exit(main())
