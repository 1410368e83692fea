"""``relay demo``: the real deployment built in network namespaces, with traffic through it.

The client has no proxy settings; the router intercepts its connections
(iptables REDIRECT) into the relay, which reaches squid on the far host only
through an ``ssh -L`` tunnel, and squid opens the connection to the server.

The client's own DNS (its /etc/hosts) maps the web server's name to a wrong
address, as a resolver may hand out the CDN node for another region. The relay
sniffs the name from the client's first bytes (HTTP Host, TLS SNI) and asks
squid for the name, so it is resolved on the far side, where it is right.

The LAN's resolver (a dnsmasq on the router) poisons another name; the router
sends the LAN's DNS to the relay's own DNS service instead, which resolves it
on the far side (unbound, over DNS over HTTPS through the tunnel), and the
client's ssh to that name is opened by name at once, though SSH never says a
name itself.
Needs root. Everything is torn down at the end, also after an error, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from relay.addresses import format_address
from relay.lab import (
    ADDR,
    Lab,
    LabError,
    Squid,
    SquidLogEntry,
    Sshd,
    Unbound,
    ssh_argv,
    sshd_across_delay_line,
    start_dnsmasq,
    start_squid,
    start_ssh_tunnel,
    start_sshd,
    start_unbound,
)
from relay.lab.servers import HttpServer, NxdomainDns, TrafficServer, pattern_sha256
from relay.lab.services import RelayProcess, intercept, intercept_dns, start_relay

RELAY_PORT = 12345
PROXY = ("127.0.0.1", 3128)  # squid on far's loopback, and the tunnel's end on the router
DELAY_PORT = 2222  # on the router's loopback: the delay line in front of far's sshd
HTTP_PORT = 80
HTTPS_PORT = 443
TRAFFIC_PORT = 7000
NAME = "mirror.relaylab.test"
# What the client's DNS says: far's leg on the server network, where no web server listens.
WRONG_ADDRESS = ADDR.far_server_side4
HELLO = b"hello from the lab server\n"  # what HttpServer answers on /hello
SSH_NAME = "git.relaylab.example"  # the name the LAN's resolver poisons; the client logs in to it by ssh
SSH_GREETING = "hello over ssh from the server"
LAN_RESOLVER = "10.77.1.53"  # the LAN's own resolver, on the router: what the client's resolv.conf names
DNS_PORT = 53
HTTP_FILE_SIZE = 32 << 20
IPV6_SIZE = 1 << 20
BULK_SEED, IPV6_SEED = 1, 2
# Per transfer; generous so that --pure on a slow machine still finishes.
TRANSFER_TIMEOUT = 60.0
# The relay and squid log a connection only once it has closed, so their lines may trail.
LOG_TIMEOUT = 10.0
RECV_SIZE = 1 << 20

EXIT_OK, EXIT_CHECK_FAILED, EXIT_NOT_ROOT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Transfer:
    label: str
    dst: str  # where the client connected, as the relay writes it: "10.77.3.1:80", "[fd77:3::2]:7000"
    name: str | None  # the name the relay should have asked squid for; None: by address
    squid_request: tuple[str, str]  # (method, url) squid should log: ("GET", "http://..."), ("CONNECT", dst)
    server: str  # the address squid should have connected to
    size: int  # bytes the client received
    seconds: float
    sha256_ok: bool
    first_byte: float  # seconds from the start of the connect to the first byte of the answer


def _progress(message: str) -> None:
    print(f"relay demo: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds the same way as Ctrl-C, so the lab's `with` block tears everything down.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _endpoint(address: str, port: int) -> str:
    return format_address((address, port))


# -- the server host's HTTP server ----------------------------------------------


class _FileHandler(BaseHTTPRequestHandler):
    timeout = TRANSFER_TIMEOUT  # a stuck client must not keep a handler thread forever

    def do_GET(self) -> None:
        if self.path != "/file":
            self.send_error(404)
            return
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the report shows the relay's and squid's view instead


class _FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listener: socket.socket, body: bytes):
        super().__init__(listener.getsockname(), _FileHandler, bind_and_activate=False)
        # The base class made its socket in our own namespace; it must live in the server host's.
        self.socket.close()
        self.socket = listener
        self.body = body
        self.server_activate()


@contextmanager
def _serving_file(lab: Lab, body: bytes) -> Iterator[None]:
    listener = lab.socket("server")
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Bound here rather than by server_bind(), which would look up a host name for the address.
    listener.bind((ADDR.server4, HTTP_PORT))
    server = _FileServer(listener, body)
    threading.Thread(target=server.serve_forever, name="demo-http", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# -- traffic from the client ----------------------------------------------------


def _curl(lab: Lab, url: str, expected: bytes, *options: str) -> tuple[int, float, bool, float]:
    """Fetch ``url`` with curl on the client; returns size, seconds, whether the body is ``expected``
    and the time to its first byte."""
    assert lab.tmpdir is not None
    path = lab.tmpdir / "downloaded-file"
    # -q ignores any ~/.curlrc and --noproxy any proxy variables: the client must not know of a proxy.
    result = lab.run(
        "client",
        [
            "curl",
            "-q",
            "--noproxy",
            "*",
            "-sS",
            "--max-time",
            str(int(TRANSFER_TIMEOUT)),
            *options,
            "-o",
            str(path),
            "-w",
            "%{http_code} %{size_download} %{time_total} %{time_starttransfer}",
            url,
        ],
        timeout=TRANSFER_TIMEOUT + 5,
    )
    status, size, seconds, first_byte = result.stdout.split()
    if status != "200":
        raise LabError(f"curl {url}: HTTP status {status}")
    sha256_ok = hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(expected).digest()
    path.unlink()
    return int(size), float(seconds), sha256_ok, float(first_byte)


def _http_download(lab: Lab, body: bytes) -> Transfer:
    url = f"http://{NAME}/file"
    return Transfer(
        f"curl {url}", _endpoint(WRONG_ADDRESS, HTTP_PORT), NAME, ("GET", url), ADDR.server4, *_curl(lab, url, body)
    )


def _https_fetch(lab: Lab, ca_file: str) -> Transfer:
    url = f"https://{NAME}/hello"
    return Transfer(
        f"curl {url}",
        _endpoint(WRONG_ADDRESS, HTTPS_PORT),
        NAME,
        ("CONNECT", f"{NAME}:{HTTPS_PORT}"),
        ADDR.server4,
        *_curl(lab, url, HELLO, "--cacert", ca_file),
    )


def _serve_https(lab: Lab) -> str | None:
    """An HTTPS server for NAME on the server host; returns the CA file for curl, None without trustme."""
    try:
        import trustme  # a test dependency: without it the demo skips its HTTPS fetch
    except ImportError:
        return None
    assert lab.tmpdir is not None
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(tls)
    ca_file = str(lab.tmpdir / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    HttpServer(lab, "server", "::", HTTPS_PORT, tls=tls)
    return ca_file


def _traffic_download(lab: Lab, address: str, size: int, seed: int, label: str) -> Transfer:
    digest, received, first_byte = hashlib.sha256(), 0, None
    started = time.monotonic()
    with lab.connect("client", address, TRAFFIC_PORT, timeout=TRANSFER_TIMEOUT) as sock:
        sock.sendall(f"DOWN {size} {seed}\n".encode())
        while data := sock.recv(RECV_SIZE):
            if first_byte is None:
                first_byte = time.monotonic() - started
            digest.update(data)
            received += len(data)
        seconds = time.monotonic() - started
    sha256_ok = received == size and digest.hexdigest() == pattern_sha256(size, seed)
    dst = _endpoint(address, TRAFFIC_PORT)
    return Transfer(label, dst, None, ("CONNECT", dst), address, received, seconds, sha256_ok, first_byte or seconds)


def _squid_entries(squid: Squid, wanted: set[tuple[str, str]]) -> list[SquidLogEntry]:
    """squid's CONNECT and GET log entries, once every wanted (method, url) is among them or LOG_TIMEOUT passed."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        entries = [entry for entry in squid.access_log() if entry.method in ("CONNECT", "GET")]
        if wanted <= {(entry.method, entry.url) for entry in entries} or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


@dataclass
class NameLookup:
    poisoned: list[str]  # what the LAN's resolver answers, asked from the router (not redirected)
    answered: list[str]  # what the client got asking the same resolver: the relay's answer
    ssh_output: str
    ssh_seconds: float


def _dig(lab: Lab, host: str) -> list[str]:
    result = lab.run(host, ["dig", "+short", "+time=5", "+tries=1", f"@{LAN_RESOLVER}", SSH_NAME, "A"], check=False)
    return result.stdout.split()


def _ssh_by_name(lab: Lab, sshd: Sshd) -> NameLookup:
    """The client resolves SSH_NAME by its resolv.conf and logs in by ssh; the router's DNS is the relay's."""
    poisoned, answered = _dig(lab, "router"), _dig(lab, "client")
    started = time.monotonic()
    argv = ssh_argv(sshd, destination=f"root@{SSH_NAME}") + [f"echo {SSH_GREETING}"]
    result = lab.run("client", argv, check=False, timeout=TRANSFER_TIMEOUT)
    output = (result.stdout.strip() or result.stderr.strip())[-200:]
    return NameLookup(poisoned, answered, output, time.monotonic() - started)


# -- the report ---------------------------------------------------------------


def _size_text(size: int) -> str:
    for unit, name in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{size} B"


def _rate_text(size: int, seconds: float) -> str:
    bits_per_second = size * 8 / max(seconds, 1e-6)
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:.2f} Gbit/s"
    if bits_per_second >= 8e6:
        return f"{bits_per_second / 8e6:.1f} MB/s"
    return f"{bits_per_second / 8e3:.1f} kB/s"


def _relay_end(conn: dict[str, str]) -> str:
    extras = [f"{key}={conn[key]}" for key in ("name-from", "http-requests", "retried-by-ip") if key in conn]
    return " ".join([conn.get("end", "?"), *extras])


def _squid_peer(squid_entries: list[SquidLogEntry], request: tuple[str, str]) -> str | None:
    """The address squid connected to for ``request``, from its HIER_DIRECT/ADDRESS peer field."""
    for entry in squid_entries:
        if (entry.method, entry.url) == request and entry.client == PROXY[0] and entry.peer.startswith("HIER_DIRECT/"):
            return entry.peer.removeprefix("HIER_DIRECT/")
    return None


def _report(
    lab: Lab,
    transfers: list[Transfer],
    connections: list[dict[str, str]],
    fast_path: str,
    squid_entries: list[SquidLogEntry],
    https_note: str,
    lookup: NameLookup,
    failures: list[str],
    rtt_ms: float,
) -> str:
    vias = ", ".join(sorted({conn.get("via", "?") for conn in connections})) or "-"
    lines = [
        f"topology (namespaces {lab.prefix}-*):",
        f"  client {ADDR.client4} [{ADDR.client6}]  no proxy settings; its /etc/hosts: {NAME} = {WRONG_ADDRESS}",
        f"  -> router  iptables REDIRECT (IPv4+IPv6) -> relay :{RELAY_PORT} -> ssh -L {_endpoint(*PROXY)}"
        " (no route to the server)",
        f"     the LAN's resolver {LAN_RESOLVER} (dnsmasq) poisons {SSH_NAME} = {WRONG_ADDRESS}; the client's DNS"
        f" (UDP and TCP 53) is redirected to the relay's --dns {ADDR.router_lan4}:{DNS_PORT}",
        f"     router--far: {f'{rtt_ms:g} ms round trip (a delay line before sshd)' if rtt_ms else 'no delay'};"
        " 1st byte: from the client's connect",
        f"  -> far {ADDR.far4}  sshd, squid on its own {_endpoint(*PROXY)}; its /etc/hosts: {NAME} = {ADDR.server4}",
        f"     unbound (DNS over HTTPS) on {ADDR.far_server_side4}: {SSH_NAME} = {ADDR.server4}",
        f"  -> server {ADDR.server4} [{ADDR.server6}]  HTTP :{HTTP_PORT}, HTTPS :{HTTPS_PORT}{https_note}, "
        f"traffic server :{TRAFFIC_PORT}, sshd :22",
        "",
        f"{'transfer from the client':<42} {'size':>10} {'1st byte':>8} {'time':>8} {'throughput':>13}  sha256",
    ]
    for transfer in transfers:
        lines.append(
            f"  {transfer.label:<40} {_size_text(transfer.size):>10} {transfer.first_byte * 1000:>6.0f}ms "
            f"{transfer.seconds:>7.3f}s "
            f"{_rate_text(transfer.size, transfer.seconds):>13}  {'OK' if transfer.sha256_ok else 'MISMATCH'}"
        )
    lines += [
        "",
        f"relay on the router (fast path: {fast_path}; via {vias}), one line per connection:",
        f"  {'client':<22} {'dst':<20} {'name':<21} {'up':>8} {'down':>10} {'time':>8}  end",
    ]
    for conn in connections:
        lines.append(
            f"  {conn.get('client', '?'):<22} {conn.get('dst', '?'):<20} {conn.get('name', '-'):<21} "
            f"{_size_text(int(conn.get('up', 0))):>8} {_size_text(int(conn.get('down', 0))):>10} "
            f"{conn.get('time', '?'):>8}  {_relay_end(conn)}"
        )
    lines += ["", f"squid on far ({_endpoint(*PROXY)}) access log:"]
    for entry in squid_entries:
        lines.append(f"  from {entry.client:<10} {entry.method:<7} {entry.url:<34} {entry.result:<15} {entry.peer}")
    named = next((transfer for transfer in transfers if transfer.name), None)
    if named is not None:
        resolved = _squid_peer(squid_entries, named.squid_request) or "nothing (no such squid log entry)"
        lines += [
            "",
            f"names: the client's DNS says {NAME} = {WRONG_ADDRESS} (wrong: no web server there);",
            f"       the relay asked squid for the name, and squid resolved it on the far side to {resolved}",
        ]
    lines += [
        "",
        f"DNS: the LAN's resolver, asked from the router, says {SSH_NAME} = {', '.join(lookup.poisoned) or 'nothing'};",
        f"     the client asking it got {', '.join(lookup.answered) or 'nothing'}: answered by the relay, resolved by"
        " unbound on far over DoH through the tunnel",
        f"ssh root@{SSH_NAME} 'echo ...' from the client: {lookup.ssh_output!r} in {lookup.ssh_seconds:.2f} s",
        "",
    ]
    if failures:
        lines += [f"FAILED: {failure}" for failure in failures]
    else:
        lines += [
            f"all checks passed: sha256 of {len(transfers)} transfers, each relayed (by name where the client "
            "used one),",
            "  each seen by squid as coming through the ssh tunnel (127.0.0.1) and connecting to the server;",
            f"  {SSH_NAME} resolved on the far side, and the ssh connection opened by that name (name-from=dns)",
        ]
    return "\n".join(lines)


def _lookup_failures(lookup: NameLookup, connections: list[dict[str, str]], squid: Squid) -> list[str]:
    failures = []
    if lookup.poisoned != [WRONG_ADDRESS]:
        failures.append(f"the LAN's resolver answered {lookup.poisoned}, not the poisoned {WRONG_ADDRESS}")
    if lookup.answered != [ADDR.server4]:
        failures.append(f"the client's lookup of {SSH_NAME} got {lookup.answered}, not far's {ADDR.server4}")
    if lookup.ssh_output != SSH_GREETING:
        failures.append(f"ssh to {SSH_NAME}: {lookup.ssh_output!r}")
    by_name = [conn for conn in connections if conn.get("name") == SSH_NAME and conn.get("name-from") == "dns"]
    if not by_name:
        failures.append(f"the relay logged no connection opened by the name {SSH_NAME} from its DNS")
    if f"{SSH_NAME}:22" not in squid.connect_targets():
        failures.append(f"squid logged no CONNECT {SSH_NAME}:22")
    return failures


def _failures(
    transfers: list[Transfer], connections: list[dict[str, str]], squid_entries: list[SquidLogEntry]
) -> list[str]:
    failures = []
    for transfer in transfers:
        if not transfer.sha256_ok:
            failures.append(f"{transfer.label}: sha256 does not match what the server sent")
        carrying = [
            conn
            for conn in connections
            if conn.get("dst") == transfer.dst and int(conn.get("down", 0)) >= transfer.size
        ]
        if not carrying:
            failures.append(f"{transfer.label}: the relay logged no connection to {transfer.dst} carrying it")
        elif transfer.name and not any(
            conn.get("name") == transfer.name and "retried-by-ip" not in conn for conn in carrying
        ):
            failures.append(f"{transfer.label}: the relay did not get it through by the name {transfer.name}")
        elif transfer.name is None and any("name" in conn for conn in carrying):
            failures.append(f"{transfer.label}: the relay used a name for a connection by address")
        method, url = transfer.squid_request
        peer = _squid_peer(squid_entries, transfer.squid_request)
        if peer is None:
            failures.append(f"{transfer.label}: squid logged no {method} {url} from {PROXY[0]} (the tunnel)")
        elif peer != transfer.server:
            failures.append(f"{transfer.label}: squid connected to {peer}, not the server {transfer.server}")
    return failures


# -- putting it together --------------------------------------------------------


def _start_deployment(lab: Lab, pure: bool, rtt_ms: float) -> tuple[Squid, RelayProcess, Sshd]:
    # Before any daemon or client starts: only processes started afterwards see these files.
    lab.set_hosts("client", {NAME: WRONG_ADDRESS})
    lab.set_resolver("client", LAN_RESOLVER)  # its hosts file first, then the LAN's resolver
    lab.set_hosts("far", {NAME: ADDR.server4, SSH_NAME: ADDR.server4})
    NxdomainDns(lab, "far")  # squid's lookups of other names fail at once instead of timing out
    _progress("starting sshd, squid and unbound on far, sshd on the server, the LAN's dnsmasq on the router")
    sshd = start_sshd(lab)
    squid = start_squid(lab, listen=[PROXY])
    unbound = start_unbound(lab, data={f"{SSH_NAME}.": [("A", ADDR.server4)]})
    server_sshd = start_sshd(lab, host="server", name="sshd-server")
    lab.run("router", ["ip", "addr", "add", f"{LAN_RESOLVER}/24", "dev", ADDR.router_lan_if])
    start_dnsmasq(lab, {SSH_NAME: WRONG_ADDRESS}, host="router", address=LAN_RESOLVER)
    _progress(f"starting the ssh -L tunnel and the relay on the router{' (pure Python)' if pure else ''}")
    if rtt_ms:
        # The far link's round trip: ssh reaches far's sshd across a delay line on the router.
        sshd, _ = sshd_across_delay_line(lab, sshd, DELAY_PORT, rtt_ms / 2)
    start_ssh_tunnel(lab, sshd, forwards=("-L", f"{_endpoint(*PROXY)}:{_endpoint(*PROXY)}"))
    relay = start_relay(lab, _relay_options(unbound), pure=pure)
    intercept_dns(lab)
    intercept(lab, "redirect", RELAY_PORT)
    return squid, relay, server_sshd


def _relay_options(unbound: Unbound) -> list[str]:
    return [
        "--upstream",
        _endpoint(*PROXY),
        "--listen",
        f"0.0.0.0:{RELAY_PORT}",
        "--listen",
        f"[::]:{RELAY_PORT}",
        "--dns",
        f"{ADDR.router_lan4}:{DNS_PORT}",
        "--dns-upstream",
        unbound.doh_url,
        "--dns-ca",
        str(unbound.ca_file),
    ]


def _run(lab: Lab, bulk_size: int, pure: bool, rtt_ms: float) -> tuple[str, list[str]]:
    """Build the deployment, send the traffic; returns the report and the failed checks."""
    _progress(f"lab {lab.prefix} is up, files in {lab.tmpdir}")
    squid, relay, server_sshd = _start_deployment(lab, pure, rtt_ms)
    fast_path = re.search(r"fast path: (.+)$", relay.log_text(), re.MULTILINE)
    _progress(f"relay is up on the router :{RELAY_PORT}")
    body = os.urandom(HTTP_FILE_SIZE)
    TrafficServer(lab, "server", "::", TRAFFIC_PORT)
    ca_file = _serve_https(lab)
    with _serving_file(lab, body):
        _progress(
            f"client: curl of a {_size_text(HTTP_FILE_SIZE)} file from http://{NAME}"
            f"{', then https://' + NAME + '/hello' if ca_file else ''}"
        )
        transfers = [_http_download(lab, body)]
        if ca_file:
            transfers.append(_https_fetch(lab, ca_file))
        _progress(f"client: DOWN {_size_text(bulk_size)} from the traffic server, then one over IPv6")
        transfers.append(_traffic_download(lab, ADDR.server4, bulk_size, BULK_SEED, f"DOWN {_size_text(bulk_size)}"))
        transfers.append(
            _traffic_download(lab, ADDR.server6, IPV6_SIZE, IPV6_SEED, f"DOWN {_size_text(IPV6_SIZE)} over IPv6")
        )
    _progress(f"client: ssh root@{SSH_NAME}, a name the LAN's resolver poisons")
    lookup = _ssh_by_name(lab, server_sshd)
    connections = relay.connections(at_least=len(transfers) + 1, timeout=LOG_TIMEOUT)
    wanted = {transfer.squid_request for transfer in transfers} | {("CONNECT", f"{SSH_NAME}:22")}
    squid_entries = _squid_entries(squid, wanted)
    failures = _failures(transfers, connections, squid_entries) + _lookup_failures(lookup, connections, squid)
    report = _report(
        lab,
        transfers,
        connections,
        fast_path[1] if fast_path else "not logged",
        squid_entries,
        "" if ca_file else " (not fetched: trustme not installed)",
        lookup,
        failures,
        rtt_ms,
    )
    return report, failures


def _mib(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of MiB")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay demo",
        description="Build client -- router -- far -- server in network namespaces (root), with the relay "
        "and an ssh tunnel on the router and squid on far, send traffic through it and report.",
        epilog="Exit status: 0 all checks passed, 1 a check or step failed, 2 not root or bad usage, 130 interrupted.",
    )
    parser.add_argument(
        "--size-mib", type=_mib, default=256, metavar="N", help="size of the bulk transfer in MiB (default: 256)"
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="round trip of the router--far link, played by a delay line before far's sshd (default: 100; 0: none)",
    )
    parser.add_argument(
        "--pure", action="store_true", help="run the relay with its pure-Python fast path (RELAY_NO_EXTENSIONS=1)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("relay demo: needs root (network namespaces, iptables)", file=sys.stderr)
        return EXIT_NOT_ROOT
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Lab() as lab:
            report, failures = _run(lab, args.size_mib << 20, args.pure, args.rtt_ms)
            print(report, flush=True)
            _progress("tearing the lab down")
    except KeyboardInterrupt:
        _progress("interrupted; the lab has been torn down")
        return EXIT_INTERRUPTED
    except (LabError, OSError, subprocess.SubprocessError) as error:
        _progress(f"failed: {error}")
        return EXIT_CHECK_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    for failure in failures:
        _progress(f"check failed: {failure}")
    return EXIT_CHECK_FAILED if failures else EXIT_OK
