"""One download across a slow far link: through an https:// proxy against through ssh -L.

    sudo .venv/bin/python bench/tls.py [--rtt-ms 100,200] [--streams 1,4] [--size-mib 64] [--rounds 1]
    .venv/bin/python bench/tls.py --in-process      # only what decrypting and encrypting cost, no lab

OpenSSH gives each forwarded connection a fixed window (about 2 MB), so one stream through
``--ssh`` moves at most that per round trip; TLS to the proxy leaves the window to the kernel.
The lab (relay.lab): squid on far's loopback, reached either by the relay's own ``--ssh``
(one ssh connection) to far's sshd, or by ``--upstream https://`` to stunnel4 on far in front of
the same squid; either way across a delay line on the router (relay/lab/delayline.py,
``start_delay_line``), so both pay the same round trip. The client downloads (and uploads)
``--streams`` files at once through the relay; sha256-checked. Reports Mbit/s, the relay's own
CPU seconds per GB (/proc/PID/stat: the TLS is in its process, ssh's crypto is not) and the whole
machine's (ssh, stunnel, squid, the delay line and the kernel included).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # run as a script from a checkout: import relay from it

from bench.lanes import IO_TIMEOUT, RELAY_PORT, TRAFFIC_PORT, download  # noqa: E402
from bench.testbed import (  # noqa: E402
    cannot_run,
    cpu_seconds,
    first_line,
    machine_busy_seconds,  # noqa: E402
    save_results,
)
from relay.lab import (  # noqa: E402
    ADDR,
    Lab,
    lab_certificates,
    sshd_across_delay_line,
    start_delay_line,
    start_squid,
    start_sshd,
    start_stunnel,
)
from relay.lab.servers import TrafficServer, pattern_sha256  # noqa: E402
from relay.lab.services import clear_interception, intercept, start_relay  # noqa: E402

SSH_LINE_PORT = 7101
TLS_LINE_PORT = 7102
STUNNEL_PORT = 8443
PROXY_NAME = "proxy.relay.lab"


def upload(lab: Lab, size: int, seed: int, errors: list) -> None:
    data = os.urandom(size)
    try:
        with lab.connect("client", ADDR.server4, TRAFFIC_PORT, timeout=IO_TIMEOUT) as sock:
            sock.sendall(f"UP {size}\n".encode())
            sock.sendall(data)
            answer = sock.recv(100).strip().decode()
        if answer != hashlib.sha256(data).hexdigest():
            errors.append(f"upload {seed}: sha256 mismatch")
    except OSError as exc:
        errors.append(f"upload {seed}: {exc}")


def one_run(lab: Lab, pid: int, direction: str, streams: int, size: int) -> dict:
    errors: list[str] = []
    if direction == "down":  # the expected digests first: making the data costs seconds per GB
        jobs = [(download, (lab, size, seed, pattern_sha256(size, seed), errors)) for seed in range(streams)]
    else:
        jobs = [(upload, (lab, size, seed, errors)) for seed in range(streams)]
    threads = [threading.Thread(target=work, args=args) for work, args in jobs]
    busy, own, started = machine_busy_seconds(), cpu_seconds([pid]), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT)
    seconds = time.monotonic() - started
    busy, own = machine_busy_seconds() - busy, cpu_seconds([pid]) - own
    if errors:
        raise RuntimeError("; ".join(errors))
    gb = streams * size / 1e9
    return {
        "mbit_s": round(streams * size * 8 / seconds / 1e6, 1),
        "relay_cpu_s_per_gb": round(own / gb, 2),
        "machine_cpu_s_per_gb": round(busy / gb, 2),
    }


def in_process(size: int) -> dict:
    """What the TLS itself costs the relay: TlsSession decrypting records a server made (into one buffer, as
    TlsRelay does) and encrypting, on memory BIOs, no sockets; CPU seconds per GB."""
    import ssl

    import trustme

    from relay.net.tls import TLS_READ, TlsSession

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(PROXY_NAME).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(incoming, outgoing, server_side=True)
    client = TlsSession(client_context, PROXY_NAME)
    while not client.handshake():
        incoming.write(client.data_to_send())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client.receive(outgoing.read())
    incoming.write(client.data_to_send())
    block = os.urandom(TLS_READ)
    records = []
    for _ in range(size // len(block)):
        server.write(block)
        records.append(outgoing.read())
    view = memoryview(bytearray(TLS_READ))
    started = time.process_time()
    for chunk in records:
        client.receive(chunk)
        while client.decrypt_into(view) == len(view):
            pass
    decrypt = time.process_time() - started
    started = time.process_time()
    for _ in range(size // len(block)):
        client.encrypt(block)
        client.data_to_send()
    encrypt = time.process_time() - started
    gb = size / 1e9
    return {"decrypt_cpu_s_per_gb": round(decrypt / gb, 2), "encrypt_cpu_s_per_gb": round(encrypt / gb, 2)}


def relay_args(way: str, delayed, certificates) -> list[str]:
    common = ["--listen", f"0.0.0.0:{RELAY_PORT}", "--preconnect", "off"]
    if way == "https":
        upstream = f"https://127.0.0.1:{TLS_LINE_PORT}"
        return ["--upstream", upstream, "--upstream-ca", str(certificates.ca), "--upstream-sni", PROXY_NAME, *common]
    return [
        *("--upstream", "127.0.0.1:3128", *common),
        *("--ssh", f"root@127.0.0.1:{SSH_LINE_PORT}", "--ssh-identity", str(delayed.client_key)),
        *("--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null"),
        *("--ssh-connections", "1"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", default="100,200")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--directions", default="down,up")
    parser.add_argument("--ways", default="https,ssh")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process", action="store_true", help="only what the TLS costs, no lab (no root)")
    args = parser.parse_args()
    if args.in_process:
        print(in_process(max(args.size_mib, 64) << 20))
        return 0
    if why := cannot_run(("squid", "sshd", "ssh", "stunnel4")):
        print(f"bench/tls.py: {why}", file=sys.stderr)
        return 2
    rtts = [float(text) for text in args.rtt_ms.split(",")]
    stream_counts = [int(text) for text in args.streams.split(",")]
    results: dict = {
        "commit": first_line(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        "size_mib": args.size_mib,
        "runs": [],
    }
    print("| way | RTT ms | streams | direction | Mbit/s | relay CPU s/GB | machine CPU s/GB |")
    print("|---|---|---|---|---|---|---|")
    for rtt in rtts:
        with Lab() as lab:
            sshd = start_sshd(lab)
            start_squid(lab, listen=[("127.0.0.1", 3128)])
            certificates = lab_certificates(lab, PROXY_NAME)
            start_stunnel(lab, (ADDR.far4, STUNNEL_PORT), ("127.0.0.1", 3128), certificates)
            start_delay_line(lab, ("127.0.0.1", TLS_LINE_PORT), (ADDR.far4, STUNNEL_PORT), rtt / 2, name="delay-tls")
            delayed, _ = sshd_across_delay_line(lab, sshd, SSH_LINE_PORT, rtt / 2)
            TrafficServer(lab, "server", "0.0.0.0", TRAFFIC_PORT)
            for round_number in range(args.rounds):
                for way in args.ways.split(","):
                    name = f"relay-{way}-{round_number}"
                    relay = start_relay(lab, relay_args(way, delayed, certificates), name=name)
                    intercept(lab, "redirect", RELAY_PORT)
                    try:
                        time.sleep(1)  # ssh logged in
                        for streams in stream_counts:
                            for direction in args.directions.split(","):
                                pid = lab.process(name).pid
                                run = one_run(lab, pid, direction, streams, args.size_mib << 20)
                                run.update(way=way, rtt_ms=rtt, streams=streams, direction=direction)
                                results["runs"].append(run)
                                print(
                                    f"| {way} | {rtt:g} | {streams} | {direction} | {run['mbit_s']} | "
                                    f"{run['relay_cpu_s_per_gb']} | {run['machine_cpu_s_per_gb']} |",
                                    flush=True,
                                )
                    finally:
                        clear_interception(lab)
                        relay.stop()
    save_results(results, "tls", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
