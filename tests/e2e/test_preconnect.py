"""Connections opened ahead of clients (--preconnect) against real proxies that close idle ones
early: squid through ssh -L and dante, both with a 2 s limit on a connection that asks nothing.
No client may ever get a dead one, a burst may not grow the pools past their bound, and a proxy
that dies and comes back is used again."""

import os
import re
import threading

import pytest

from relay.lab import ADDR, start_dante, start_squid, start_ssh_tunnel
from relay.lab.servers import HttpServer
from relay.net.preconnect import AUTO_MAX
from tests.e2e.clients import download, get_hello, upload
from tests.e2e.conftest import RELAY_PORT
from tests.e2e.health import preconnected

METRICS_PORT = 9141
SHORT = 2  # seconds the proxies wait for a first request
IMPATIENT_SQUID = "127.0.0.1:3141"  # through ssh -L
IMPATIENT_DANTE = f"socks5://{ADDR.far4}:1085"
HTTP_PORT = 8081


@pytest.fixture(scope="module")
def impatient(lab):
    squid = start_squid(
        lab, listen=[("127.0.0.1", 3141)], name="squid-impatient", extra=[f"request_start_timeout {SHORT} seconds"]
    )
    tunnel = start_ssh_tunnel(lab, lab.sshd, forwards=("-L", f"{IMPATIENT_SQUID}:127.0.0.1:3141"), name="ssh-L-3141")
    dante = start_dante(lab, listen=[(ADDR.far4, 1085)], name="dante-impatient", extra=[f"timeout.negotiate: {SHORT}"])
    http = HttpServer(lab, "server", "0.0.0.0", HTTP_PORT)
    yield {"squid": squid, "dante": dante}
    http.close()
    for service in (tunnel, squid, dante):
        service.stop()


def start(relays, upstream, *extra):
    return relays.start(
        [
            "--upstream",
            upstream,
            "--listen",
            f"0.0.0.0:{RELAY_PORT}",
            "--metrics",
            f"127.0.0.1:{METRICS_PORT}",
            *extra,
        ],
        intercept_mode="redirect",
    )


def counters(lab) -> dict[str, float]:
    text = lab.run("router", ["curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    found = {}
    for name, labels, value in re.findall(r"^(relay_[a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M):
        found[name + labels] = found.get(name + labels, 0) + float(value)
    return found


def failed_attempts(found) -> float:
    return sum(value for key, value in found.items() if key.startswith("relay_upstream_attempts_failed_total"))


@pytest.mark.parametrize("upstream", [IMPATIENT_SQUID, IMPATIENT_DANTE], ids=["squid-via-ssh-L", "dante"])
def test_connections_the_proxy_closed_while_pooled_never_reach_a_client(lab, impatient, relays, upstream):
    start(relays, upstream, "--preconnect", "2")
    for round_number in range(5):
        download(lab, 200_000, seed=round_number)
        upload(lab, os.urandom(100_000))
        threading.Event().wait(SHORT + 0.7)  # longer than the proxy keeps a pooled connection
    found = counters(lab)
    assert found.get('relay_preconnect_total{outcome="taken"}', 0) >= 5
    # The proxy's closes were seen (or learnt, then the pool kept them younger), never met by a client.
    dropped = found.get('relay_preconnect_total{outcome="closed"}', 0)
    assert dropped >= 1 and found.get('relay_preconnect_total{outcome="aged"}', 0) >= 1
    assert failed_attempts(found) == 0


def test_a_burst_leaves_the_pool_within_its_bound(lab, impatient, relays):
    relay = start(relays, IMPATIENT_DANTE)
    errors = []

    def one(seed):
        try:
            download(lab, 50_000, seed=seed)
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    threading.Event().wait(1.5)  # a sweep or two: the pool refilled to its size
    assert 1 <= preconnected(lab, relay, lab.process(relay.name).pid) <= AUTO_MAX


def test_a_proxy_that_dies_and_returns_is_used_again_and_nothing_piles_up(lab, impatient, relays):
    relay = start(relays, IMPATIENT_DANTE, "--health-interval", "1")
    download(lab, 100_000)
    impatient["dante"].kill()
    with pytest.raises((AssertionError, OSError)):
        download(lab, 100_000)
    threading.Event().wait(3)  # refills fail and back off meanwhile
    assert preconnected(lab, relay, lab.process(relay.name).pid) == 0
    impatient["dante"].start()
    threading.Event().wait(2.5)  # the health check sees it back
    download(lab, 100_000, seed=9)


def test_plain_http_forwarded_in_absolute_form_uses_them_too(lab, impatient, relays):
    start(relays, IMPATIENT_SQUID)
    request = f"GET /hello HTTP/1.1\r\nHost: {ADDR.server4}:{HTTP_PORT}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(3):
        with lab.connect("client", ADDR.server4, HTTP_PORT, timeout=30) as sock:
            sock.sendall(request)
            response = b""
            while data := sock.recv(65536):
                response += data
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello from the lab server\n")
        threading.Event().wait(0.5)  # the pool refills meanwhile
    found = counters(lab)
    # Each later client's request went out on a connection opened ahead or one an earlier client left
    # (the client's Connection: close is its own: the relay keeps its connection to squid open).
    outcomes = [found.get(f'relay_preconnect_total{{outcome="{outcome}"}}', 0) for outcome in ("taken", "reused")]
    assert sum(outcomes) >= 2, found


def test_plain_http_keep_alive_proxy_connections_pass_from_client_to_client(lab, impatient, relays):
    """Clients that each send one keep-alive request and leave: the next client's request goes out on the
    connection to squid the last one left (squid counts one client connection for them all)."""
    start(relays, IMPATIENT_SQUID, "--preconnect", "off")
    request = f"GET /hello HTTP/1.1\r\nHost: {ADDR.server4}:{HTTP_PORT}\r\n\r\n".encode()
    for _ in range(4):
        get_hello(lab, HTTP_PORT, request)
        threading.Event().wait(0.2)  # the relay sees the client leave and keeps the proxy connection
    found = counters(lab)
    assert found.get('relay_preconnect_total{outcome="reused"}', 0) == 3
    assert found.get('relay_preconnect_total{outcome="kept"}', 0) >= 3
