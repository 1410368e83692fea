"""One connection through a Pump of its own, for tests that look at a single relayed connection."""

from typing import NamedTuple

import trio

from relay.net.pump import Pump


class Ended(NamedTuple):
    token: object
    ended: str
    sent_up: int
    sent_down: int


async def pump(client, upstream, *, impl, idle_timeout=600.0, half_closed_timeout=60.0, **options) -> Ended:
    """Relay one connection through a Pump of its own; return how it ended."""
    results = []

    def on_finished(*result):
        results.append(Ended(*result))
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        relay = Pump(on_finished, impl=impl)
        nursery.start_soon(relay.run)
        relay.add(
            client, upstream, "the token", idle_timeout=idle_timeout, half_closed_timeout=half_closed_timeout, **options
        )
    [result] = results
    assert result.token == "the token"
    return result
