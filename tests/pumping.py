"""One connection through a Pump of its own, for tests that look at a single relayed connection."""

from typing import NamedTuple

import trio

from relay.net.pump import Pump
from relay.net.sockmap import MAX_BACKLOG
from tests.root import require_root


class Ended(NamedTuple):
    token: object
    ended: str
    sent_up: int
    sent_down: int


async def pump(
    client,
    upstream,
    *,
    impl,
    engine="splice",
    max_backlog=MAX_BACKLOG,
    idle_timeout=600.0,
    half_closed_timeout=60.0,
    **options,
) -> Ended:
    """Relay one connection through a Pump of its own; return how it ended.

    With ``engine="sockmap"`` the kernel must carry it (root), not the splice engine.
    """
    if engine == "sockmap":
        require_root("the sockmap engine needs CAP_BPF and CAP_NET_ADMIN")
    results = []

    def on_finished(*result):
        results.append(Ended(*result))
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        relay = Pump(on_finished, impl=impl, engine=engine, max_backlog=max_backlog)
        nursery.start_soon(relay.run)
        relay.add(
            client, upstream, "the token", idle_timeout=idle_timeout, half_closed_timeout=half_closed_timeout, **options
        )
        if engine == "sockmap":
            assert relay.carrier is not None and len(relay.carrier) + len(results) == 1
    [result] = results
    assert result.token == "the token"
    return result
