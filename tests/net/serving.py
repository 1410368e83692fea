"""A Server's connection machinery running in a test, shut down in the order Server.serve does."""

from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def serving(server):
    """The pump, the dialer and the waiting room running, and a nursery for the connections' tasks;
    on the way out, what is left is ended as at shutdown."""
    connections = server.connections
    async with trio.open_nursery() as services:
        services.start_soon(connections.pump.run)
        services.start_soon(server.dialer.run)
        services.start_soon(connections.waiting.run)
        async with trio.open_nursery() as connections.tasks:
            yield connections
            connections.waiting.close()
            connections.tasks.cancel_scope.cancel()
        server.dialer.close()
        connections.pump.close()
        services.cancel_scope.cancel()
