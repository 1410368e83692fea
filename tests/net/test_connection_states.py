"""Property: whatever happens to a set of connections (client bytes, FIN, reset, silence, dial
success or failure, a proxy slow to answer for a name and the race by address it starts, a
reload, a drain at any point), each ends exactly once and gives back everything it held exactly
once; on both fast-path twins."""

import socket

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Config
from relay.metrics import Metrics
from relay.net.connection import TRANSITIONS, Connection, InvalidTransition, State
from relay.net.pump import Pump
from relay.net.server import Server
from tests.conn_lines import conn_lines
from tests.net.fake_connect_proxy import NAME, FakeProxy
from tests.net.serving import serving
from tests.proto.test_sniff import client_hello
from tests.sockpairs import hard_close

CLIENT_ACTIONS = ("speak", "fin", "reset", "silent", "partial")
# bypass-domain makes the relay read first bytes (and so use the waiting room) with a direct upstream.
SETTINGS = {"upstream": ["direct"], "allow-dest": ["127.0.0.0/8"], "bypass-domain": ["example.org"]}
HELLO = client_hello(NAME)
# Through the fake proxy: names race addresses after 20 ms, and a silent proxy times out in 150 ms.
PROXY_SETTINGS = {"allow-dest": ["127.0.0.0/8"], "name-wait": "0.02", "handshake-timeout": "0.15"}
PROXY_ANSWERS = {"name": ("ok", "silent", "refuse", "after address"), "address": ("ok", "silent", "refuse")}


def make_server(sniff_timeout: str, settings=SETTINGS) -> Server:
    config = Config.from_values({**settings, "sniff-timeout": sniff_timeout})
    return Server(config, Metrics(version="t", fast_path="python"))


async def scenario(impl, actions, target_open, reload_after, settle, answers=None):
    """``answers``: through a FakeProxy answering so (see tests.net.fake_connect_proxy), else direct;
    then "speak" is a TLS ClientHello for its NAME."""
    async with trio.open_nursery() as proxies:
        settings = SETTINGS
        if answers is not None:
            proxy = FakeProxy(answers)
            where = await proxies.start(proxy.serve)
            settings = {**PROXY_SETTINGS, "upstream": [f"127.0.0.1:{where[1]}"]}
        outcome = await scenario_with(impl, actions, target_open, reload_after, settle, settings, answers is not None)
        proxies.cancel_scope.cancel()
    return outcome


async def scenario_with(impl, actions, target_open, reload_after, settle, settings, through_proxy):
    server = make_server("0.05", settings)
    connections = server.connections
    connections.pump = Pump(Connection.relayed, impl=impl)
    await server.pool.resolve()
    budget = connections.slots.value
    ends: dict[Connection, list[str]] = {}  # holds each connection, so no id is reused
    real_end = Connection.end

    def counted_end(self, ended, detail=None, *, clean=False):
        ends.setdefault(self, []).append(ended)
        real_end(self, ended, detail, clean=clean)

    Connection.end = counted_end
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)  # the destination: dialed directly (its address is what the client connected to)
    clients, served = [], []
    try:
        async with serving(server):
            accepted = []
            for action in actions:
                client = socket.create_connection(target.getsockname())
                accepted.append(target.accept())
                clients.append(client)
                if action == "speak":
                    client.sendall(HELLO if through_proxy else b"GET / HTTP/1.1\r\nHost: h.example\r\n\r\n")
                elif action == "partial":
                    client.sendall(b"\x16\x03\x01\x02")  # a ClientHello's start: more is awaited
                elif action == "fin":
                    client.shutdown(socket.SHUT_WR)
                elif action == "reset":
                    hard_close(client)
            if not target_open:
                target.close()  # every dial is refused
            for index, (conn, peer) in enumerate(accepted):
                if index == reload_after:
                    connections.config = Config.from_values({**settings, "sniff-timeout": "0.02"})
                await connections.slots.acquire()  # as accept_loop does
                connections.accepted(conn, peer)
            await trio.sleep(settle)
            if target_open:
                target.setblocking(False)
                while True:  # the dials' server ends, so relayed ones see both sides
                    try:
                        served.append(target.accept()[0])
                    except (BlockingIOError, OSError):
                        break
    finally:
        Connection.end = real_end
        target.close()
        for sock in clients + served:
            sock.close()
    return connections, budget, ends


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    actions=st.lists(st.sampled_from(CLIENT_ACTIONS), min_size=1, max_size=6),
    target_open=st.booleans(),
    reload_after=st.integers(0, 6),
    settle=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_every_connection_ends_once_and_gives_back_everything(impl, actions, target_open, reload_after, settle):
    connections, budget, ends = trio.run(scenario, impl, actions, target_open, reload_after, settle)
    assert_each_ended_once_and_gave_back_everything(connections, budget, ends, actions)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    actions=st.lists(st.sampled_from(CLIENT_ACTIONS), max_size=5).map(lambda others: ["speak", *others]),
    name_answer=st.sampled_from(PROXY_ANSWERS["name"]),
    address_answer=st.sampled_from(PROXY_ANSWERS["address"]),
    reload_after=st.integers(0, 6),
    settle=st.sampled_from([0.1, 0.0, 0.03, 0.3]),
)
def test_racing_a_slow_name_by_address_still_ends_each_once(
    impl, actions, name_answer, address_answer, reload_after, settle
):
    answers = {"name": name_answer, "address": address_answer}
    connections, budget, ends = trio.run(scenario, impl, actions, True, reload_after, settle, answers)
    assert_each_ended_once_and_gave_back_everything(connections, budget, ends, actions)


def assert_each_ended_once_and_gave_back_everything(connections, budget, ends, actions):
    assert len(ends) == len(actions) and all(len(each) == 1 for each in ends.values()), ends
    assert len(connections) == 0
    assert connections.slots.value == budget
    assert connections.per_source == {} and connections.own_sources == set()
    assert connections.metrics.active == 0
    assert len(connections.dialer) == 0  # no attempt of a race left behind


def test_the_table_allows_no_move_out_of_ended_and_every_state_can_end():
    assert TRANSITIONS[State.ENDED] == set()
    assert all(State.ENDED in moves for state, moves in TRANSITIONS.items() if state is not State.ENDED)


def test_a_second_end_raises_before_releasing_anything():

    async def body():
        server = make_server("0.3")
        connections = server.connections
        budget = connections.slots.value
        a, b = socket.socketpair()
        await connections.slots.acquire()
        connection = Connection(connections, b, ("127.0.0.1", 1), connections.config, connections.pool)
        connection.end("cancelled")
        with pytest.raises(InvalidTransition):
            connection.end("cancelled")
        a.close()
        return connections, budget

    connections, budget = trio.run(body)
    assert connections.slots.value == budget and len(connections) == 0
    assert connections.metrics.ended == {"cancelled": 1}


def test_a_refused_end_says_whose_fault_in_the_log_line_and_the_metrics(impl):
    with conn_lines() as lines:
        connections, _, ends = trio.run(scenario, impl, ["speak"], False, 9, 0.1)
    assert list(ends.values()) == [["refused:connect-econnrefused"]]
    # No proxy in the way (direct): the destination refused, not an upstream.
    assert [(line["end"], line["fault"]) for line in lines] == [("refused:connect-econnrefused", "target")]
    assert connections.metrics.attempts_failed == {("direct", "target"): 1}


def test_a_name_of_this_router_is_never_asked_for():
    async def body():
        server = make_server("0.3")
        connections = server.connections
        connections.own_names.names = frozenset({"router.lan"})
        a, b = socket.socketpair()
        await connections.slots.acquire()
        connection = Connection(connections, b, ("127.0.0.1", 1), connections.config, connections.pool)
        names = [connection.usable_name(name) for name in ("router.lan", "mirror.example", None)]
        connection.end("cancelled")
        a.close()
        return names

    assert trio.run(body) == [None, "mirror.example", None]
