"""--early-data auto's probe (relay.net.early_data) against an HTTP proxy played by the test on loopback:
each way a proxy can treat a ClientHello sent after CONNECT, and the verdict it gives (the e2e suite
runs it against squid, tinyproxy and privoxy)."""

import logging
import socket
from types import SimpleNamespace

import pytest
import trio

from relay.config import Config
from relay.net import early_data
from relay.net.upstreams import UpstreamState
from relay.proto.early_data import early_tls_records
from tests.net.test_dial import running_dialer

OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
SERVER_HELLO = b"\x16\x03\x03\x00\x02\x02\x00"


async def play_in_turn(listener, answers: list[str], heard: list) -> None:
    for answer in answers:
        await play(listener, answer, heard)


async def play(listener, answer: str, heard: list) -> None:
    """One proxy connection: the CONNECT's head and what followed it go in ``heard``, then ``answer``."""
    conn, _ = await listener.accept()
    with conn:
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data or not early_tls_records(data.partition(b"\r\n\r\n")[2]):
                data += await conn.recv(65536)
        heard.append(data.partition(b"\r\n\r\n"))
        if answer == "refuses":
            await conn.send(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n")
        elif answer in ("closes", "drops"):
            await conn.send(OK)
        elif answer != "silent":
            await conn.send(OK + (SERVER_HELLO if answer == "keeps" else b"HTTP/1.1 400 Bad Request\r\n"))
        if answer in ("silent", "drops"):
            await trio.sleep(5)


def setup(port: int) -> tuple[UpstreamState, Config]:
    config = Config.from_values(
        {"upstream": [f"127.0.0.1:{port}"], "health-target": "192.0.2.1:443", "handshake-timeout": "0.5"}
    )
    return UpstreamState(config.upstream, [(socket.AF_INET, ("127.0.0.1", port))], None, config), config


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("keeps", True),
        ("drops", False),  # 200, then nothing: the server waits for a ClientHello it never got
        ("closes", False),
        ("refuses", None),  # asked again later
        ("silent", None),  # no answer to the CONNECT itself: the handshake timeout
        ("not-tls", None),  # the health target is no TLS server: said, and no verdict
    ],
)
async def test_the_probe_says_whether_the_proxy_kept_the_client_hello(answer, verdict, caplog):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    state, config = setup(listener.getsockname()[1])
    heard = []
    async with running_dialer() as dialer, trio.open_nursery() as nursery:
        nursery.start_soon(play, listener, answer, heard)
        with trio.fail_after(5):
            assert await early_data.probe(dialer, state, config) is verdict
        nursery.cancel_scope.cancel()
    [(head, _, after)] = heard
    assert head.startswith(b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n") and b"\r\nConnection: close" in head
    assert after == early_tls_records(after) and len(after) > 200  # a whole ClientHello of its own
    assert ("must be a TLS server" in caplog.text) is (answer == "not-tls")


async def test_find_out_asks_again_until_a_verdict_then_says_it_once(caplog, monkeypatch):
    monkeypatch.setattr(early_data, "FIRST_RETRY", 0.01)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    state, config = setup(listener.getsockname()[1])
    assert state.early_data == "auto" and not state.sends_early_data
    heard = []
    caplog.set_level(logging.INFO)
    async with running_dialer() as dialer, trio.open_nursery() as nursery:
        nursery.start_soon(play_in_turn, listener, ["refuses", "refuses", "keeps"], heard)
        with trio.fail_after(5):
            await early_data.find_out(dialer, [state], config)
        nursery.cancel_scope.cancel()
    assert len(heard) == 3 and state.keeps_early_data is True and state.sends_early_data
    assert caplog.text.count("keeps early data sent after CONNECT (a ClientHello to 192.0.2.1:443)") == 1


async def test_the_lanes_of_one_proxy_share_one_probe_through_one_that_is_up(caplog):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    state, config = setup(listener.getsockname()[1])
    down = UpstreamState(state.upstream, state.addresses, SimpleNamespace(up=False), config)
    up = UpstreamState(state.upstream, state.addresses, SimpleNamespace(up=True), config)
    heard = []
    caplog.set_level(logging.INFO)
    async with running_dialer() as dialer, trio.open_nursery() as nursery:
        nursery.start_soon(play_in_turn, listener, ["drops"], heard)
        with trio.fail_after(10):
            await early_data.find_out(dialer, [down, up], config)
        nursery.cancel_scope.cancel()
    assert len(heard) == 1 and down.keeps_early_data is False and up.keeps_early_data is False
    assert caplog.text.count("drops early data sent after CONNECT") == 1
