"""Time to the first response byte of new connections across a slow far link.

    sudo .venv/bin/python bench/latency.py [--rtt-ms 100] [--count 50] [--rate-mbit R] [--out FILE]

What a user behind the router feels on every new connection is the round trips before its first
byte, not throughput. The lab (relay.lab): client -> router -> far -> server, where the router
reaches far's sshd and dante only across a TCP delay line (relay/lab/delayline.py: --rtt-ms, half
each way, optionally --rate-mbit), squid runs on far behind ``ssh -L``, and ``ssh -D`` runs on the
router. The server has an HTTPS and an HTTP server for NAME, and a server that speaks first (an SSH
banner) on port 22; the client resolves NAME to the server's address.

Each path is used by ``--count`` sequential and then ``--count`` concurrent new connections, each
timed from the start of its connect() to its first response byte:

    https-by-name    TLS 1.3 with SNI = NAME, then GET /hello
    banner-by-addr   connect to port 22, read the banner
    http-by-name     GET /hello with Host: NAME (the relay forwards it in absolute form)

Paths: relay and redsocks (the same upstream, intercepted by REDIRECT), and the client using the
proxy itself as a reference ("direct": the proxy's own handshake from the client, no relay); the
relay also once with --server-first-ports none (the sniff wait every server-first connection paid
before), and with --early-data on through squid (the ClientHello sent with the CONNECT), also over its
own --ssh to far's sshd across the line (one ssh process), without a session (the default) and with one. With
--bulk, the https case is repeated while one 4 GB download crosses the same tunnel.
Results: JSON in bench/results/, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # run as a script from a checkout: import relay from it

import trustme  # noqa: E402

from bench.testbed import cannot_run, first_line  # noqa: E402
from relay.lab import (  # noqa: E402
    ADDR,
    Lab,
    sshd_across_delay_line,
    start_dante,
    start_delay_line,
    start_squid,
    start_ssh_tunnel,
    start_sshd,
)
from relay.lab.servers import BannerServer, HttpServer  # noqa: E402
from relay.lab.services import Service, clear_interception, intercept  # noqa: E402

RESULTS = HERE / "results"
NAME = "cdn.latency.test"
SSH_LINE_PORT, DANTE_LINE_PORT = 7101, 7102  # delay lines on the router
SQUID_PORT, SSH_D_PORT = 3128, 1081
RELAY_PORT, REDSOCKS_PORT = 12345, 12346
IO_TIMEOUT = 30.0
BULK_BYTES = 4 << 30


@dataclass
class Path_:
    """One way for the client's connections to reach the server."""

    name: str
    kind: str  # relay, redsocks or direct
    upstream: str  # http or socks5, and where the router reaches it
    proxy_port: int
    extra: list[str] = field(default_factory=list)
    own_ssh: bool = False  # the relay's own --ssh to far's sshd across the line, not the shared ssh -L


PATHS = [
    Path_("relay, ssh -L squid", "relay", "http", SQUID_PORT),
    Path_("relay, ssh -L squid, sniff wait", "relay", "http", SQUID_PORT, ["--server-first-ports", "none"]),
    Path_("relay, ssh -L squid, early data", "relay", "http", SQUID_PORT, ["--early-data", "on"]),
    Path_("relay, ssh -L squid, --ssh, early data", "relay", "http", SQUID_PORT, ["--early-data", "on"], True),
    Path_(
        "relay, ssh -L squid, --ssh --ssh-session on, early data",
        "relay",
        "http",
        SQUID_PORT,
        ["--early-data", "on", "--ssh-session", "on"],
        True,
    ),
    Path_("redsocks, ssh -L squid", "redsocks", "http", SQUID_PORT),
    Path_("client to squid via ssh -L", "direct", "http", SQUID_PORT),
    Path_("relay, dante", "relay", "socks5", DANTE_LINE_PORT),
    Path_("redsocks, dante", "redsocks", "socks5", DANTE_LINE_PORT),
    Path_("client to dante", "direct", "socks5", DANTE_LINE_PORT),
    Path_("relay, ssh -D", "relay", "socks5", SSH_D_PORT),
]


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab = lab
        self.args = args
        self.client_tls: ssl.SSLContext | None = None
        self.running: Service | None = None

    def build(self) -> None:
        lab = self.lab
        lab.set_hosts("client", {NAME: ADDR.server4})
        lab.set_hosts("far", {NAME: ADDR.server4})
        sshd = start_sshd(lab)
        start_squid(lab, listen=[("127.0.0.1", SQUID_PORT)])
        start_dante(lab, listen=[(ADDR.far4, 1080)], external=ADDR.far_server_side4)
        one_way = self.args.rtt_ms / 2
        delayed, _ = sshd_across_delay_line(lab, sshd, SSH_LINE_PORT, one_way, rate_mbit=self.args.rate_mbit)
        self.delayed_sshd = delayed
        start_delay_line(
            lab, ("0.0.0.0", DANTE_LINE_PORT), (ADDR.far4, 1080), one_way, rate_mbit=self.args.rate_mbit, name="dl2"
        )
        forwards = ["-o", "GatewayPorts=yes", "-D", f"127.0.0.1:{SSH_D_PORT}"]
        for address in ("127.0.0.1", ADDR.router_lan4):  # the relay's, and the direct client's
            forwards += ["-L", f"{address}:{SQUID_PORT}:127.0.0.1:{SQUID_PORT}"]
        start_ssh_tunnel(lab, delayed, forwards=forwards, wait=("127.0.0.1", SQUID_PORT))
        ca = trustme.CA()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(NAME).configure_cert(server_tls)
        self.client_tls = ssl.create_default_context()
        ca.configure_trust(self.client_tls)
        HttpServer(lab, "server", "0.0.0.0", 443, tls=server_tls)
        HttpServer(lab, "server", "0.0.0.0", 80)
        BannerServer(lab, "server", "0.0.0.0", 22)

    # -- the path in use ----------------------------------------------------------------

    def use(self, path: Path_) -> None:
        if self.running:
            self.running.stop()
            self.running = None
        clear_interception(self.lab)
        if path.kind == "direct":
            return
        directory = self.lab.tmpdir / f"path-{PATHS.index(path)}"
        directory.mkdir(exist_ok=True)
        if path.kind == "relay":
            upstream = f"{path.upstream}://127.0.0.1:{path.proxy_port}"
            argv = [sys.executable, "-m", "relay", "--upstream", upstream, "--listen", f"0.0.0.0:{RELAY_PORT}"]
            if path.own_ssh:  # one ssh, as the shared tunnel; squid's address is then far's 127.0.0.1
                sshd = self.delayed_sshd
                argv += ["--ssh", f"root@{sshd.address}:{sshd.port}", "--ssh-identity", str(sshd.client_key)]
                argv += ["--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null"]
                argv += ["--ssh-connections", "1"]
            port, argv = RELAY_PORT, [*argv, *path.extra]
        else:
            conf = directory / "redsocks.conf"
            kind = "http-connect" if path.upstream == "http" else "socks5"
            conf.write_text(
                "base { log_debug = off; log_info = off; daemon = off; redirector = iptables; }\n"
                f"redsocks {{ local_ip = 0.0.0.0; local_port = {REDSOCKS_PORT}; ip = 127.0.0.1; "
                f"port = {path.proxy_port}; type = {kind}; }}\n"
            )
            port, argv = REDSOCKS_PORT, ["redsocks", "-c", str(conf)]
        service = Service(self.lab, "router", f"{path.kind}-{PATHS.index(path)}", argv, ready=("127.0.0.1", port))
        service.start()
        self.running = service
        intercept(self.lab, "redirect", port)

    # -- one connection -----------------------------------------------------------------

    def first_byte(self, path: Path_, case: str) -> float:
        """Seconds from connect() to the first response byte of one new connection."""
        port = {"https-by-name": 443, "banner-by-addr": 22, "http-by-name": 80}[case]
        started = time.monotonic()
        if path.kind == "direct":
            proxy = ADDR.router_lan4, path.proxy_port
            sock = self.lab.connect("client", *proxy, timeout=IO_TIMEOUT)
            if path.upstream == "http" and case == "http-by-name":
                request = f"GET http://{NAME}/hello HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()
                return self._first_response_byte(sock, request, started)
            if self._proxy_handshake(sock, path.upstream, case == "banner-by-addr", port):
                sock.close()  # the banner came with the proxy's answer
                return time.monotonic() - started
        else:
            sock = self.lab.connect("client", ADDR.server4, port, timeout=IO_TIMEOUT)
        if case == "https-by-name":
            sock = self.client_tls.wrap_socket(sock, server_hostname=NAME)
        request = b"" if case == "banner-by-addr" else f"GET /hello HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()
        return self._first_response_byte(sock, request, started)

    @staticmethod
    def _first_response_byte(sock: socket.socket, request: bytes, started: float) -> float:
        with sock:
            sock.sendall(request)
            if not sock.recv(1):
                raise ConnectionError("closed before the first byte")
            return time.monotonic() - started

    @staticmethod
    def _proxy_handshake(sock: socket.socket, kind: str, by_address: bool, port: int) -> bytes:
        """What a proxy-aware client does itself: CONNECT, or SOCKS5 by name (by address for the banner).
        Returns the server's bytes that came with the proxy's answer."""
        host = ADDR.server4 if by_address else NAME
        if kind == "http":
            sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("the proxy closed")
                head += data
            if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode())
            return head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 greeting refused")
        if by_address:
            target = b"\x01" + socket.inet_aton(host)
        else:
            target = b"\x03" + bytes([len(host)]) + host.encode()
        sock.sendall(b"\x05\x01\x00" + target + struct.pack("!H", port))
        reply = sock.recv(10)  # IPv4 BND.ADDR: dante answers with its own
        if len(reply) < 2 or reply[1] != 0:
            raise ConnectionError(f"SOCKS5 request refused: {reply!r}")
        return b""

    # -- a case -------------------------------------------------------------------------

    def measure(self, path: Path_, case: str) -> dict:
        count = self.args.count
        self.first_byte(path, case)  # warm: the tunnel's and the relay's first connection
        sequential = [self.first_byte(path, case) for _ in range(count)]
        with ThreadPoolExecutor(max_workers=count) as pool:
            concurrent = list(pool.map(lambda _: self.first_byte(path, case), range(count)))
        return {"sequential": summary(sequential), "concurrent": summary(concurrent)}

    def measure_under_bulk(self, path: Path_) -> dict:
        """The https case while one download fills the tunnel the new connections share."""
        stop = threading.Event()
        moved = [0]

        def download() -> None:
            with self.lab.connect("client", ADDR.server4, 80, timeout=IO_TIMEOUT) as sock:
                sock.sendall(f"GET /blob/{BULK_BYTES}/1 HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
                while not stop.is_set() and (data := sock.recv(1 << 16)):
                    moved[0] += len(data)

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        time.sleep(2)  # past slow start: the tunnel is full
        try:
            timings = [self.first_byte(path, "https-by-name") for _ in range(self.args.count)]
        finally:
            stop.set()
            thread.join(IO_TIMEOUT)
        return {"sequential": summary(timings), "bulk_bytes": moved[0]}


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000, 1),
    }


CASES = {
    "https-by-name": ["relay, ssh -L squid", "relay, ssh -L squid, early data", "redsocks, ssh -L squid"]
    + ["relay, ssh -L squid, --ssh, early data", "relay, ssh -L squid, --ssh --ssh-session on, early data"]
    + ["client to squid via ssh -L"]
    + ["relay, dante", "redsocks, dante", "client to dante", "relay, ssh -D"],
    "banner-by-addr": ["relay, ssh -L squid", "relay, ssh -L squid, sniff wait", "redsocks, ssh -L squid"]
    + ["client to squid via ssh -L", "relay, dante", "redsocks, dante"],
    "http-by-name": ["relay, ssh -L squid", "redsocks, ssh -L squid", "client to squid via ssh -L"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="the far link's round trip (default 100)")
    parser.add_argument("--count", type=int, default=50, help="connections per path, sequential and concurrent")
    parser.add_argument("--rate-mbit", type=float, default=None, help="cap the far link's rate each way")
    parser.add_argument("--bulk", action="store_true", help="also measure https while a download fills the tunnel")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--paths", action="append", default=[], help="only the paths whose name has this in it (repeatable)"
    )
    args = parser.parse_args()
    if why := cannot_run(("redsocks", "squid", "danted", "sshd")):
        print(f"bench/latency.py: {why}", file=sys.stderr)
        return 2
    by_name = {path.name: path for path in PATHS}
    results: dict = {
        "commit": first_line(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        "rtt_ms": args.rtt_ms,
        "rate_mbit": args.rate_mbit,
        "count": args.count,
        "cases": {},
    }
    with Lab() as lab:
        bench = Bench(lab, args)
        bench.build()
        for path in PATHS:
            if args.paths and not any(part in path.name for part in args.paths):
                continue
            bench.use(path)
            for case, names in CASES.items():
                if path.name in names:
                    result = bench.measure(path, case)
                    results["cases"].setdefault(case, {})[path.name] = result
                    print(f"{case:15} {path.name:33} {describe(result)}", flush=True)
            if args.bulk and path.name in ("relay, ssh -L squid", "redsocks, ssh -L squid"):
                result = bench.measure_under_bulk(path)
                results["cases"].setdefault("https-under-bulk", {})[path.name] = result
                print(f"{'https-under-bulk':15} {path.name:33} {describe(result)}", flush=True)
        bench.use(by_name["client to dante"])  # stops the last relay
    out = args.out or RESULTS / f"latency-{results['commit']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{table(results)}\nwritten to {out}")
    return 0


def describe(result: dict) -> str:
    return "  ".join(
        f"{kind} p50 {result[kind]['p50_ms']} ms p90 {result[kind]['p90_ms']} ms"
        for kind in ("sequential", "concurrent")
        if kind in result
    )


def table(results: dict) -> str:
    """Markdown: each case's paths, with the ratio of their sequential median to redsocks' on the same proxy."""
    lines = [
        "| case | path | sequential p50 / p90 ms | concurrent p50 / p90 ms | p50 vs redsocks |",
        "|---|---|---|---|---|",
    ]
    for case, paths in results["cases"].items():
        for name, result in paths.items():
            proxy = name.split(", ")[1] if ", " in name else ""  # a variant's name goes on after a comma
            baseline = paths.get(f"redsocks, {proxy}")
            ratio = ""
            if baseline and not name.startswith("redsocks"):
                ratio = f"{result['sequential']['p50_ms'] / baseline['sequential']['p50_ms']:.2f}x"
            cells = [
                f"{result[kind]['p50_ms']} / {result[kind]['p90_ms']}" if kind in result else ""
                for kind in ("sequential", "concurrent")
            ]
            lines.append(f"| {case} | {name} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
