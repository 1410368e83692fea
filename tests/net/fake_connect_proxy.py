"""An HTTP proxy played by a test on loopback: it answers each CONNECT as told, by whether it asks
for NAME or for an address, and then plays the destination."""

import trio

NAME = "slow.example"
ANSWER_HEAD = b"HTTP/1.1 200 Connection established\r\n\r\n"


class FakeProxy:
    """An HTTP proxy on loopback answering each CONNECT as ``answers`` says for its kind ("name" or
    "address"): "ok" (opened, then the target's own greeting), "silent", "refuse" (503), or "after
    address" (opened once the address was asked). Notes what was asked, each CONNECT's head, what
    came after it on each connection (``received``, once it closed) and what the relay closed."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.listener = trio.socket.socket()
        self.asked: list[str] = []
        self.heads: list[bytes] = []
        self.received: list[tuple[str, bytes]] = []  # (kind, every byte after the CONNECT's head)
        self.asked_for = {"name": trio.Event(), "address": trio.Event()}
        self.closed = {"name": trio.Event(), "address": trio.Event()}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        task_status.started(self.listener.getsockname())
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.listener.accept()
                nursery.start_soon(self.handle, conn)

    async def handle(self, conn):
        with conn:
            try:
                await self.answer(conn)
            except OSError:  # reset by the relay: a race lost, a client gone
                pass

    async def answer(self, conn):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 4096:
            data = await conn.recv(4096)
            if not data:
                return
            head += data
        head, _, after = head.partition(b"\r\n\r\n")
        self.heads.append(head)
        target = head.split()[1].decode()
        kind = "name" if target.startswith(NAME) else "address"
        self.asked.append(target)
        self.asked_for[kind].set()
        answer = self.answers[kind]
        if answer == "refuse":
            self.received.append((kind, after))
            await conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        if answer == "after address":
            await self.asked_for["address"].wait()
            answer = "ok"
        try:
            if answer == "ok":
                await conn.send(ANSWER_HEAD + f"hello from {target}\n".encode())
            while data := await conn.recv(4096):
                after += data
        finally:
            self.received.append((kind, after))
            self.closed[kind].set()
