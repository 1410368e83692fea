"""bench/benchtool.c's DNS load generator, against a small dnspython server on loopback: the bench's hit
and miss figures are only as good as its count of what was answered, and of what was answered wrongly."""

import ipaddress
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

BENCHTOOL = Path(__file__).resolve().parent.parent / "bench" / "benchtool.c"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (scripts/setup installs it)")


@pytest.fixture(scope="module")
def benchtool(tmp_path_factory):
    binary = tmp_path_factory.mktemp("benchtool") / "benchtool"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(binary), str(BENCHTOOL)],
        check=True,
        timeout=120,
    )
    return str(binary)


class Server:
    """Answers each query with one A record, or as ``behaviour`` says; counts the queries and their names."""

    def __init__(self, behaviour: str = "good", address: str = "192.0.2.7"):
        self.behaviour, self.address = behaviour, address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.names: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve(self) -> None:
        while self.running:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            self.names.append(query.question[0].name.to_text())
            if self.behaviour == "silent":
                continue
            response = dns.message.make_response(query)
            address = self.address
            if self.behaviour == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                if self.behaviour == "numbered":  # h<N>: the address plus N
                    number = int(query.question[0].name.labels[0][1:])
                    address = str(ipaddress.ip_address(self.address) + number)
                response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", address))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def run(benchtool, server, names="3", seconds="0.5", concurrency="2", count="0", timeout="0.3", expect="192.0.2.7"):
    argv = [benchtool, "dns", "127.0.0.1", str(server.port), "bench.example.", names, seconds, concurrency, count]
    result = subprocess.run([*argv, timeout, "-", expect], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def test_hits_ask_the_same_names_and_count_every_answer(benchtool):
    server = Server()
    try:
        result = run(benchtool, server, count="30")
    finally:
        server.close()
    assert result["queries"] == result["answered"] == 30
    assert result["timeouts"] == 0 and result["bad"] == {}
    assert set(server.names) == {"h0.bench.example.", "h1.bench.example.", "h2.bench.example."}
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


def test_misses_ask_a_new_name_every_time(benchtool):
    server = Server()
    try:
        result = run(benchtool, server, names="miss", count="20")
    finally:
        server.close()
    assert result["answered"] == 20
    assert len(set(server.names)) == 20 and all(name.startswith("m") for name in server.names)


@pytest.mark.parametrize(
    ("behaviour", "address", "reason"),
    [("good", "192.0.2.8", "wrong-address"), ("servfail", "192.0.2.7", "rcode-2")],
)
def test_wrong_answers_are_counted_by_reason_not_as_answered(benchtool, behaviour, address, reason):
    server = Server(behaviour, address)
    try:
        result = run(benchtool, server, count="10")
    finally:
        server.close()
    assert result["answered"] == 0
    assert result["bad"] == {reason: 10}


@pytest.mark.parametrize(
    ("behaviour", "expect", "answered"), [("numbered", "+192.0.2.7", 30), ("numbered", "+192.0.2.8", 0)]
)
def test_hit_names_with_an_address_each_are_checked_each_against_its_own(benchtool, behaviour, expect, answered):
    server = Server(behaviour)
    try:
        result = run(benchtool, server, count="30", expect=expect)
    finally:
        server.close()
    assert result["answered"] == answered and sum(result["bad"].values()) == 30 - answered


def test_a_silent_server_costs_a_timeout_per_query_and_the_run_ends(benchtool):
    server = Server("silent")
    try:
        result = run(benchtool, server, count="4", concurrency="2", timeout="0.2")
    finally:
        server.close()
    assert result["answered"] == 0 and result["timeouts"] == 4
    assert result["p50_ms"] is None
