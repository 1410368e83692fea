"""Taking a slot for the next client: free ones first, reclaimed ones only while a client waits."""

import socket

import trio

from relay.net.listener import client_waiting, take_slot


def listening():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    return listener


def test_a_free_slot_is_taken_without_reclaiming():
    async def body():
        slots, calls = trio.Semaphore(1), []
        with listening() as listener:
            await take_slot(listener, slots, lambda: calls.append(1) or True)
        return slots.value, calls

    assert trio.run(body) == (0, [])


def test_with_every_slot_taken_nothing_is_reclaimed_until_a_client_waits():
    async def body():
        slots, calls = trio.Semaphore(0), []

        def reclaim():
            calls.append(trio.current_time())
            slots.release()  # the reclaimed connection's end gives its slot back
            return True

        with listening() as listener:
            with trio.move_on_after(0.3):
                await take_slot(listener, slots, reclaim)
            assert calls == [] and not client_waiting(listener)
            with socket.create_connection(listener.getsockname()):
                assert client_waiting(listener)
                with trio.fail_after(2):
                    await take_slot(listener, slots, reclaim)
        return slots.value, len(calls)

    assert trio.run(body) == (0, 1)


def test_when_nothing_can_be_reclaimed_the_next_freed_slot_is_taken():
    async def body():
        slots, calls = trio.Semaphore(0), []
        with listening() as listener, socket.create_connection(listener.getsockname()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_slot, listener, slots, lambda: calls.append(1) or False)
                await trio.sleep(0.2)
                slots.release()
        return slots.value, len(calls) >= 2  # asked again while it waited

    assert trio.run(body) == (0, True)


def test_without_reclaim_it_waits_for_a_freed_slot():
    async def body():
        slots = trio.Semaphore(0)
        with listening() as listener, socket.create_connection(listener.getsockname()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_slot, listener, slots, None)
                await trio.sleep(0.1)
                slots.release()
        return slots.value

    assert trio.run(body) == 0
