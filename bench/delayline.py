"""A TCP delay line: a far link's round trip, emulated where the kernel has no netem.

    python bench/delayline.py LISTEN_ADDR:PORT TARGET_ADDR:PORT ONE_WAY_MS

Accepts connections on LISTEN, opens one to TARGET for each, and passes the bytes both ways,
each chunk held back ONE_WAY_MS after it was read: a request and its answer cross it in twice
that, on top of the lab's own path. Bandwidth is not limited, but a direction holds at most
MAX_HELD_BYTES in flight (its window): past that it stops reading, and TCP pushes back. Closing
one side (FIN) is passed on after the delay too; a reset or error closes both. Runs until killed;
used by bench/dns.py in the router namespace, in front of the SSH server and the proxy on far.
"""

from __future__ import annotations

import sys
from collections import deque

import trio

CHUNK = 65536
MAX_HELD_BYTES = 4 * 1024 * 1024


class Line:
    """One direction: what was read, each with the time it may be written."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
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
            self.held.append((trio.current_time() + self.delay, data))
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


async def carry(client: trio.SocketStream, target: tuple[str, int], delay: float) -> None:
    try:
        # Trio's streams set TCP_NODELAY: no Nagle wait on top of the delay.
        async with client, await trio.open_tcp_stream(*target) as server:
            async with trio.open_nursery() as nursery:
                for source, sink in ((client, server), (server, client)):
                    line = Line(delay)
                    nursery.start_soon(line.read_from, source)
                    nursery.start_soon(line.write_to, sink)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side reset or went away: both are closed


def endpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


async def main(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    print(f"delay line {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, {delay * 1000:g} ms each way", flush=True)
    await trio.serve_listeners(lambda stream: carry(stream, target, delay), listeners)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    trio.run(main, endpoint(sys.argv[1]), endpoint(sys.argv[2]), float(sys.argv[3]) / 1000)
