"""--early-data: a TLS client's ClientHello sent to an HTTP proxy with the CONNECT request, against the stock
Debian configs of squid, tinyproxy and privoxy (the lab of test_hostnames: each on the far host, through
ssh -L, and an HTTPS server on the server host that serves /blob/SIZE/SEED)."""

import hashlib
import time

import pytest

from relay.lab import ADDR
from relay.lab.servers import pattern_sha256
from tests.e2e.conftest import Relays
from tests.e2e.test_hostnames import FAR_UNKNOWN, NAME, STOCK_PROXIES, curl, names_lab  # noqa: F401

HEALTH_TARGET = f"{ADDR.server4}:443"  # the lab's HTTPS server: the auto probe's destination
# What the probe found in this lab (squid 5.7, tinyproxy 1.11, privoxy 3.0 of Debian 12).
KEEPS = {"squid": True, "tinyproxy": True, "privoxy": False}


@pytest.fixture
def relays(names_lab):  # noqa: F811
    relays = Relays(names_lab)
    yield relays
    relays.finish()


@pytest.fixture
def run_relay(relays):
    return relays.run


def verdict_line(proxy: str) -> str:
    keeps = KEEPS[proxy]
    return f"{'keeps' if keeps else 'drops'} early data sent after CONNECT (a ClientHello to {HEALTH_TARGET}): " + (
        f"early data {'on' if keeps else 'off'}"
    )


def fetch_blob(lab, size: int, seed: int, host: str = NAME) -> None:
    path = lab.tmpdir / f"blob-{seed}"
    curl(lab, "-o", str(path), f"https://{host}/blob/{size}/{seed}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pattern_sha256(size, seed)


@pytest.mark.parametrize("proxy", STOCK_PROXIES)
def test_the_auto_probe_finds_out_which_proxies_keep_early_data(run_relay, names_lab, proxy):  # noqa: F811
    relay = run_relay(STOCK_PROXIES[proxy], "--health-target", HEALTH_TARGET)
    assert relay.wait_for_log(verdict_line(proxy), timeout=15), relay.log_text()
    assert relay.log_text().count("early data sent after CONNECT") == 1
    # Either way HTTPS works: with the ClientHello sent early through a proxy that keeps it, without otherwise.
    assert curl(names_lab, f"https://{NAME}/hello").stdout == "hello from the lab server\n"
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and line["name"] == NAME
    assert ("early-data" in line) is KEEPS[proxy]


def test_without_a_health_target_auto_sends_no_early_data(run_relay, names_lab):  # noqa: F811
    relay = run_relay(STOCK_PROXIES["squid"])
    assert relay.wait_for_log("no early data after CONNECT")
    assert curl(names_lab, f"https://{NAME}/hello").stdout == "hello from the lab server\n"
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and "early-data" not in line


def test_an_upstreams_own_early_data_setting_in_the_config_file_wins(relays, names_lab):  # noqa: F811
    config = names_lab.tmpdir / "early-data.toml"
    config.write_text(
        'early-data = "off"\n'
        f'upstream = [{{ url = "http://{STOCK_PROXIES["squid"]}", early-data = "on" }}]\n'
        'listen = ["0.0.0.0:12345"]\n'
    )
    relay = relays.start(["--config", str(config)], intercept_mode="redirect")
    assert curl(names_lab, f"https://{NAME}/hello").stdout == "hello from the lab server\n"
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and int(line["early-data"]) > 200


@pytest.mark.parametrize("proxy", ["squid", "tinyproxy"])
def test_transfers_with_early_data_arrive_intact(run_relay, names_lab, proxy, tmp_path):  # noqa: F811
    relay = run_relay(STOCK_PROXIES[proxy], "--early-data", "on")
    fetch_blob(names_lab, 8 << 20, seed=41)
    body = bytes(range(256)) * 12_000
    (tmp_path / "up.bin").write_bytes(body)
    result = curl(names_lab, "-T", str(tmp_path / "up.bin"), f"https://{NAME}/sha256")
    assert result.stdout.strip() == hashlib.sha256(body).hexdigest()
    lines = relay.connections(at_least=2)
    assert [line["end"] for line in lines] == ["closed", "closed"]
    for line in lines:  # a ClientHello of curl's, whole records, and counted in up=
        assert 200 < int(line["early-data"]) <= 16384 and int(line["up"]) > int(line["early-data"])


def test_privoxy_drops_early_data_so_forcing_it_on_breaks_https(run_relay, names_lab):  # noqa: F811
    relay = run_relay(STOCK_PROXIES["privoxy"], "--early-data", "on")
    assert curl(names_lab, "--max-time", "3", f"https://{NAME}/hello", check=False).returncode != 0
    [line] = relay.connections(at_least=1)
    assert line["early-data"] and int(line["down"]) == 0  # the server never got a ClientHello to answer


def test_a_refusal_after_early_data_is_retried_by_address_with_the_same_bytes(run_relay, names_lab):  # noqa: F811
    # The far side cannot resolve the name: squid answers 500 to the CONNECT that carried the ClientHello, and
    # closes (Connection: close). The retry by address, on a new connection, sends the same ClientHello.
    relay = run_relay(STOCK_PROXIES["squid"], "--early-data", "on")
    seen = len(names_lab.stock_squid.access_log())
    fetch_blob(names_lab, 1 << 20, seed=43, host=FAR_UNKNOWN)
    [line] = relay.connections(at_least=1)
    assert line["end"] == "closed" and line["name"] == FAR_UNKNOWN and line["retried-by-ip"] == "http-500"
    assert int(line["early-data"]) > 200
    # Squid logs a tunnel when it closes: wait for both. It closed after its 500 (as without Connection: close,
    # in this lab), and read neither ClientHello as a request: at most it notes a connection that ended before
    # a request's head, status 000.
    deadline = time.monotonic() + 10
    while len(connects := connect_entries(names_lab, seen)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connects == [(f"{FAR_UNKNOWN}:443", "500"), (f"{ADDR.server4}:443", "200")]
    others = [entry for entry in names_lab.stock_squid.access_log()[seen:] if entry.method != "CONNECT"]
    assert all(entry.result.endswith("/000") for entry in others), others


def connect_entries(lab, seen: int) -> list[tuple[str, str]]:
    return [
        (entry.url, entry.result.split("/")[1])
        for entry in lab.stock_squid.access_log()[seen:]
        if entry.method == "CONNECT"
    ]
