"""SchedulerPeek reads Trio's internals: these fail if a Trio release moves them (the pump would then
silently lose its busy-transfer shortcut)."""

import select
import socket

import trio

from relay.net.scheduler import SchedulerPeek


async def test_this_trio_can_be_peeked_at():
    assert SchedulerPeek.current() is not None


async def test_idle_is_false_while_a_task_is_runnable():
    peek = SchedulerPeek.current()
    await trio.testing.wait_all_tasks_blocked()
    assert peek.idle()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        assert not peek.idle()  # started, not yet run: no checkpoint in between


async def test_next_deadline_is_the_earliest_cancel_scope_deadline():
    peek = SchedulerPeek.current()
    with trio.CancelScope(deadline=trio.current_time() + 1000):
        with trio.CancelScope(deadline=trio.current_time() + 5) as nearer:
            assert peek.next_deadline() == nearer.deadline


async def test_fd_is_readable_when_a_waiting_task_has_io():
    peek = SchedulerPeek.current()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)

        async def waiter():
            await trio.lowlevel.wait_readable(a)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            with select.epoll() as outer:
                outer.register(peek.fd, select.EPOLLIN)
                assert outer.poll(0) == []
                b.send(b"x")
                assert outer.poll(1) == [(peek.fd, select.EPOLLIN)]
