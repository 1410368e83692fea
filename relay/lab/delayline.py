"""A TCP delay line: a far link's round trip (and optionally its bandwidth), emulated where the
kernel has no netem.

    python -m relay.lab.delayline LISTEN_ADDR:PORT TARGET_ADDR:PORT ONE_WAY_MS [RATE_MBIT]

Accepts connections on LISTEN, opens one to TARGET for each, and passes the bytes both ways,
each chunk held back ONE_WAY_MS after it was read: a request and its answer cross it in twice
that, on top of the lab's own path. With RATE_MBIT, each direction of the link (all its
connections together) is paced to that rate, like a slow line would. A direction of one
connection holds at most MAX_HELD_BYTES in flight (its window): past that it stops reading and
TCP pushes back, so one stream moves at most MAX_HELD_BYTES per one-way delay. Closing one side
(FIN) is passed on after the delay too; a reset or error closes both. Runs until killed.

The kernel completes the client's TCP handshake with the line at once, so the line plays the far
one's round trip itself: it connects to TARGET one delay after accepting (the SYN's way there),
and passes the client's first bytes on no sooner than a real client could have sent them, one
round trip after its connect, so a connect across the line costs what it would across the link.

Put it in front of the far host's sshd and proxies (:func:`relay.lab.services.start_delay_line`),
and point ``ssh`` or the relay at it: everything crossing it then pays the far link's round trip.
"""

from __future__ import annotations

import sys
from collections import deque

import trio

CHUNK = 65536
MAX_HELD_BYTES = 4 * 1024 * 1024


class Pacer:
    """One direction of the link's bandwidth, shared by its connections: each chunk is given the
    next free slot of the line, as long as its size takes at the rate."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.bytes_per_second = bytes_per_second
        self.free_at = 0.0

    async def wait_turn(self, size: int) -> None:
        if self.bytes_per_second is None:
            return
        start = max(trio.current_time(), self.free_at)
        self.free_at = start + size / self.bytes_per_second
        await trio.sleep_until(self.free_at)


class Line:
    """One direction of one connection: what was read, each with the time it may be written."""

    def __init__(self, delay: float, pacer: Pacer, not_before: float = 0.0) -> None:
        self.delay = delay
        self.pacer = pacer
        self.not_before = not_before  # nothing leaves before this (Trio's clock)
        self.held: deque[tuple[float, bytes]] = deque()  # b"" marks the end (FIN)
        self.bytes_held = 0
        self.changed = trio.Event()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def read_from(self, source: trio.SocketStream) -> None:
        while True:
            while self.bytes_held >= MAX_HELD_BYTES:
                await self.changed.wait()
            data = await source.receive_some(CHUNK)
            if data:
                # The link's bandwidth is spent as the bytes enter it; the delay starts after.
                await self.pacer.wait_turn(len(data))
            self.held.append((max(trio.current_time(), self.not_before) + self.delay, data))
            self.bytes_held += len(data)
            self._wake()
            if not data:
                return

    async def write_to(self, sink: trio.SocketStream) -> None:
        while True:
            while not self.held:
                await self.changed.wait()
            due, data = self.held[0]
            await trio.sleep_until(due)
            self.held.popleft()
            self.bytes_held -= len(data)
            self._wake()
            if not data:
                await sink.send_eof()
                return
            await sink.send_all(data)


async def carry(client: trio.SocketStream, target: tuple[str, int], delay: float, pacers: tuple[Pacer, Pacer]) -> None:
    accepted = trio.current_time()
    try:
        async with client:
            await trio.sleep(delay)  # the SYN crossing the link
            # Trio's streams set TCP_NODELAY: no Nagle wait on top of the delay.
            async with await trio.open_tcp_stream(*target) as server, trio.open_nursery() as nursery:
                # The client could send only once the SYN-ACK came back: a round trip after its connect.
                after_handshake = accepted + 2 * delay
                for source, sink, pacer, not_before in (
                    (client, server, pacers[0], after_handshake),
                    (server, client, pacers[1], 0.0),
                ):
                    line = Line(delay, pacer, not_before)
                    nursery.start_soon(line.read_from, source)
                    nursery.start_soon(line.write_to, sink)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side reset or went away: both are closed


def endpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


async def main(listen: tuple[str, int], target: tuple[str, int], delay: float, rate_mbit: float | None) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    rate = None if rate_mbit is None else rate_mbit * 1e6 / 8
    pacers = (Pacer(rate), Pacer(rate))
    capped = "" if rate_mbit is None else f", {rate_mbit:g} Mbit/s each way"
    route = f"{listen[0]}:{listen[1]} -> {target[0]}:{target[1]}"
    print(f"delay line {route}, {delay * 1000:g} ms each way{capped}", flush=True)
    await trio.serve_listeners(lambda stream: carry(stream, target, delay, pacers), listeners)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    rate_mbit = float(sys.argv[4]) if len(sys.argv) == 5 else None
    trio.run(main, endpoint(sys.argv[1]), endpoint(sys.argv[2]), float(sys.argv[3]) / 1000, rate_mbit)
