"""A scripted upstream proxy for fault cases: it reads a real client handshake, then answers
with whatever bytes the test chose (malformed, truncated, slow, or valid with trailing data)."""

import socket
import threading
import time

from relay.lab.servers import CHUNK

MAX_REQUEST = 64 * 1024
DONE = b"done"


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client left during the handshake")
        data += chunk
    return data


def read_http_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > MAX_REQUEST:
            raise ConnectionError("no complete CONNECT request")
        data += chunk
    return data


def read_socks5_request(conn: socket.socket) -> bytes:
    version, methods = _read_exactly(conn, 2)
    _read_exactly(conn, methods)
    conn.sendall(b"\x05\x00")  # no authentication
    head = _read_exactly(conn, 4)
    atyp = head[3]
    if atyp == 1:
        rest = _read_exactly(conn, 4 + 2)
    elif atyp == 4:
        rest = _read_exactly(conn, 16 + 2)
    else:
        length = _read_exactly(conn, 1)
        rest = length + _read_exactly(conn, length[0] + 2)
    return head + rest


READERS = {"http": read_http_request, "socks5": read_socks5_request}


class FakeProxy:
    """Listens in ``host`` on ``address``:``port``; for each connection reads a ``kind``
    ("http" or "socks5") request, sends ``reply`` (a list of chunks, ``pause`` seconds apart),
    then echoes (``then="echo"``), closes (``"close"``) or holds the connection silently
    (``"hold"``, until the test ends)."""

    def __init__(
        self,
        lab,
        kind: str,
        reply: list[bytes],
        *,
        then: str = "close",
        pause: float = 0.0,
        host: str = "router",
        address: str = "127.0.0.1",
        port: int = 3990,
    ):
        self.read_request, self.reply, self.then, self.pause = READERS[kind], reply, then, pause
        self.requests: list[bytes] = []
        self.released = threading.Event()
        self.listener = lab.socket(host)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(64)
        self.url = f"{kind}://{address}:{port}"
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(30)
        with conn:
            try:
                self.requests.append(self.read_request(conn))
                for index, chunk in enumerate(self.reply):
                    if index and self.pause:
                        time.sleep(self.pause)
                    conn.sendall(chunk)
                if self.then == "echo":
                    while data := conn.recv(CHUNK):
                        conn.sendall(data)
                elif self.then == "hold":
                    self.released.wait(30)
            except OSError:
                pass  # the relay gave up on us: what the fault cases expect

    def close(self):
        self.released.set()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
