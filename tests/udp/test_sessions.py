"""relay.udp.sessions: one session per client address and port, the caps, idle deadlines, the queue."""

import pytest

from relay.udp.sessions import Refused, SessionTable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def table(max_sessions=4, max_per_source=2, idle=60.0, queue_limit=3):
    clock = Clock()
    return SessionTable(max_sessions, max_per_source, idle, clock, queue_limit), clock


def test_a_session_per_client_address_and_port():
    sessions, _ = table()
    first = sessions.open(("10.0.0.2", 5000))
    assert sessions.get(("10.0.0.2", 5000)) is first and sessions.get(("10.0.0.2", 5001)) is None
    with pytest.raises(ValueError):
        sessions.open(("10.0.0.2", 5000))
    assert len(sessions) == 1 and list(sessions) == [first]


def test_the_per_source_cap_then_the_overall_cap_refuse_new_sessions_until_one_closes():
    sessions, _ = table(max_sessions=3, max_per_source=2)
    a1, _ = sessions.open(("10.0.0.2", 1)), sessions.open(("10.0.0.2", 2))
    with pytest.raises(Refused) as caught:
        sessions.open(("10.0.0.2", 3))
    assert caught.value.reason == "source-full"
    sessions.open(("10.0.0.3", 1))
    with pytest.raises(Refused) as caught:
        sessions.open(("10.0.0.4", 1))
    assert caught.value.reason == "sessions-full"
    sessions.close(a1)
    sessions.close(a1)  # twice: no effect
    assert sessions.open(("10.0.0.2", 3)).client == ("10.0.0.2", 3)
    assert len(sessions) == 3


def test_no_per_source_cap_with_zero():
    sessions, _ = table(max_sessions=5, max_per_source=0)
    for port in range(5):
        sessions.open(("10.0.0.2", port + 1))
    assert len(sessions) == 5


def test_the_idle_deadline_moves_with_activity_not_with_age():
    sessions, clock = table(idle=60.0)
    session = sessions.open(("10.0.0.2", 1))
    assert session.idle_deadline() == 160.0
    clock.now = 150.0
    session.active(clock())
    assert session.idle_deadline() == 210.0 and session.opened == 100.0


def test_datagrams_wait_in_a_bounded_queue_and_counters_add_up():
    sessions, _ = table(queue_limit=2)
    session = sessions.open(("10.0.0.2", 1))
    assert session.queue(("192.0.2.1", 53), b"a") and session.queue(("192.0.2.1", 53), b"b")
    assert not session.queue(("192.0.2.1", 53), b"c")
    assert [payload for _, payload in session.queued] == [b"a", b"b"]
    session.relayed(1, 10, 0, 0)
    session.relayed(1, 5, 1, 7)
    assert (session.datagrams_up, session.bytes_up, session.datagrams_down, session.bytes_down) == (2, 15, 1, 7)
