"""The ReadinessLoop: calls for ready fds and due timers from one task, over real socketpairs."""

import gc
import select
import socket
import weakref

import pytest
import trio

from relay.net.readiness import STALE_MIN, ReadinessLoop


@pytest.fixture
async def loop(nursery):
    """A ReadinessLoop whose run() goes on in the test's nursery."""
    loop = ReadinessLoop()
    nursery.start_soon(loop.run)
    yield loop
    loop.close()


@pytest.fixture
def socketpair():
    """Makes connected socket pairs, closed when the test ends."""
    made = []

    def make():
        pair = socket.socketpair()
        made.extend(pair)
        return pair

    yield make
    for sock in made:
        sock.close()


async def until(condition, seconds=2):
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.005)


async def test_a_ready_fd_is_called_for_until_unwatched_or_once_if_one_shot(loop, socketpair):
    calls = []
    level, level_peer = socketpair()
    once, once_peer = socketpair()
    loop.watch(level.fileno(), select.EPOLLIN, calls.append, "level")
    loop.watch(once.fileno(), select.EPOLLIN | select.EPOLLONESHOT, calls.append, "once")
    await trio.sleep(0.05)
    assert calls == []
    level_peer.send(b"x")
    once_peer.send(b"x")
    await until(lambda: calls.count("level") >= 3)  # level-triggered: every pass until read
    loop.unwatch(level.fileno())
    counted = len(calls)
    await trio.sleep(0.05)
    assert len(calls) == counted and calls.count("once") == 1
    loop.watch(once.fileno(), select.EPOLLIN | select.EPOLLONESHOT, calls.append, "again")  # re-armed
    await until(lambda: "again" in calls)


async def test_an_fd_unwatched_by_an_earlier_call_of_the_same_pass_is_not_called(loop, socketpair):
    calls = []
    first, first_peer = socketpair()
    second, second_peer = socketpair()

    def ready(name, other):
        calls.append(name)
        loop.unwatch(other.fileno())  # e.g. a connection ending its partner's

    loop.watch(first.fileno(), select.EPOLLIN | select.EPOLLONESHOT, ready, "first", second)
    loop.watch(second.fileno(), select.EPOLLIN | select.EPOLLONESHOT, ready, "second", first)
    first_peer.send(b"x")
    second_peer.send(b"x")
    await until(lambda: calls)
    await trio.sleep(0.05)
    assert calls in (["first"], ["second"])


async def test_an_fd_closed_and_reused_in_the_same_pass_is_not_called_for_the_old_event(loop, socketpair):
    """A call that ends another watched socket and opens one that gets the same fd number (a won
    dial cancelling its rival, then another connection dialing): the event the pass already holds
    for the old socket must not reach the new one's callback."""
    calls = []
    first, first_peer = socketpair()
    second, second_peer = socketpair()
    reused = []

    def ready(name, other):
        calls.append(name)
        number = other.fileno()
        loop.unwatch(number)
        other.close()
        fresh, fresh_peer = socketpair()  # nothing to read on it
        assert fresh.fileno() == number  # the lowest free number: the one just closed
        reused.append(fresh)
        loop.watch(number, select.EPOLLIN, calls.append, "fresh")

    loop.watch(first.fileno(), select.EPOLLIN | select.EPOLLONESHOT, ready, "first", second)
    loop.watch(second.fileno(), select.EPOLLIN | select.EPOLLONESHOT, ready, "second", first)
    first_peer.send(b"x")
    second_peer.send(b"x")
    await until(lambda: calls)
    await trio.sleep(0.05)
    assert calls in (["first"], ["second"])


async def test_timers_are_called_once_due_in_time_order_and_ties_in_the_order_set(loop):
    calls = []

    def due(name, when):
        calls.append((name, trio.current_time() >= when))

    now = trio.current_time()
    for name, delay in [("c", 0.06), ("a", 0.02), ("b1", 0.04), ("b2", 0.04)]:
        loop.call_at(now + delay, due, name, now + delay)
    await until(lambda: len(calls) == 4)
    assert calls == [("a", True), ("b1", True), ("b2", True), ("c", True)]


async def test_an_earlier_timer_set_while_run_waits_wakes_it_earlier(loop):
    calls = []
    loop.call_at(trio.current_time() + 10, calls.append, "late")
    await trio.sleep(0.05)  # run() now waits until the late one
    begun = trio.current_time()
    loop.call_at(begun + 0.05, calls.append, "early")
    await until(lambda: calls)
    assert calls == ["early"] and trio.current_time() - begun < 0.5


async def test_a_cancelled_timer_is_not_called_and_lets_go_of_its_arguments(loop):
    calls = []

    class Connection:
        pass

    now = trio.current_time()
    cancelled = loop.call_at(now + 0.02, calls.append, "cancelled")
    made = loop.call_at(now + 0.04, calls.append, "made")
    loop.cancel(cancelled)
    await until(lambda: calls)
    await trio.sleep(0.05)
    assert calls == ["made"]
    loop.cancel(made)  # made already: nothing
    loop.cancel(cancelled)  # twice: nothing
    connection = Connection()
    gone = weakref.ref(connection)
    loop.cancel(loop.call_at(now + 60, calls.append, connection))
    del connection
    gc.collect()
    assert gone() is None  # its heap entry stays until its time, without the connection


async def test_cancelled_timers_do_not_pile_up_in_the_heap(loop):
    """Cancelled timers stay in the heap until their time, unless they are more than half of it."""
    calls = []
    far = trio.current_time() + 60
    timers = [loop.call_at(far, calls.append, number) for number in range(3 * STALE_MIN)]
    assert len(loop._timers) == 3 * STALE_MIN
    for timer in timers:
        loop.cancel(timer)
    assert len(loop._timers) <= STALE_MIN
    loop.call_at(trio.current_time() + 0.05, calls.append, "live")  # among the cancelled ones
    await until(lambda: calls)
    assert calls == ["live"]


async def test_close_from_another_task_ends_run_and_no_call_comes_after(socketpair):
    calls = []
    loop = ReadinessLoop()
    ready, peer = socketpair()
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            loop.watch(ready.fileno(), select.EPOLLIN, calls.append, "ready")
            timer = loop.call_at(trio.current_time() + 0.1, calls.append, "due")
            await trio.sleep(0.02)
            loop.close()
        # run() returned by itself: the nursery closed without a cancel.
    peer.send(b"x")
    await trio.sleep(0.15)
    assert calls == [] and loop.closed
    loop.cancel(timer)
    loop.unwatch(ready.fileno())
    loop.close()  # twice: nothing
    await loop.run()  # closed: returns at once


async def test_a_raising_callback_costs_only_its_call(loop, socketpair, caplog):
    calls = []

    def broken(name):
        raise RuntimeError(name)

    ready, peer = socketpair()
    loop.watch(ready.fileno(), select.EPOLLIN | select.EPOLLONESHOT, broken, "ready")
    loop.call_at(trio.current_time(), broken, "due")
    peer.send(b"x")
    loop.call_at(trio.current_time() + 0.05, calls.append, "after")
    await until(lambda: calls)
    assert caplog.text.count("internal error in") == 2


async def test_an_fd_the_epoll_cannot_take_raises_and_is_not_watched(loop, tmp_path):
    with open(tmp_path / "regular", "w") as file:
        with pytest.raises(PermissionError):  # a regular file is always ready: epoll refuses it
            loop.watch(file.fileno(), select.EPOLLIN, print)
        loop.unwatch(file.fileno())  # not watched: nothing to undo
