"""Servers on the lab's server host, run in threads of this process.

``TrafficServer`` speaks a one-line command protocol that lets a client check
integrity (sha256) and half-close in either direction; ``BannerServer`` speaks
first, like SSH or SMTP. Each connection gets a thread; every socket has a
timeout so a stuck peer cannot keep a thread alive forever.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading

from relay.lab.netns import Lab

IO_TIMEOUT = 60.0
CHUNK = 1 << 16


def pattern(size: int, seed: int):
    """The bytes ``DOWN size seed`` sends, in chunks: reproducible on the client side."""
    rng = random.Random(seed)
    left = size
    while left:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def pattern_sha256(size: int, seed: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


def read_line(sock: socket.socket, limit: int = 256) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(line) >= limit:
            raise ConnectionError("no command line")
        line += byte
    return line[:-1]


def digest_until(sock: socket.socket, size: int | None) -> str:
    """sha256 of the next ``size`` bytes, or of everything until EOF when size is None."""
    digest = hashlib.sha256()
    left = size
    while left is None or left > 0:
        data = sock.recv(CHUNK if left is None else min(CHUNK, left))
        if not data:
            if left is None:
                break
            raise ConnectionError("EOF before the announced size")
        digest.update(data)
        if left is not None:
            left -= len(data)
    return digest.hexdigest()


class _ThreadedServer:
    def __init__(self, lab: Lab, host: str, address: str, port: int):
        self.lab = lab
        self.listener = lab.socket(host, socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address == "::":
            self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6 on one socket
        self.listener.bind((address, port))
        self.listener.listen(128)
        self.connections = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed at teardown
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        conn.settimeout(IO_TIMEOUT)
        try:
            with conn:
                self.handle(conn)
        except OSError as exc:
            self.errors.append(repr(exc))

    def close(self):
        self.listener.close()


class TrafficServer(_ThreadedServer):
    """Commands, one line each:

    ``UP n``      read n bytes, answer their sha256, close.
    ``UPEOF``     read until the client's FIN, answer the sha256, close (client->server half-close).
    ``DOWN n s``  send n bytes of pattern(n, s), close.
    ``DOWNHALF n s``  send them, shutdown(SHUT_WR), then record what the client still sends (server->client half-close).
    ``ECHO``      echo until EOF.
    """

    def __init__(self, lab: Lab, host: str, address: str, port: int):
        self.after_eof: list[bytes] = []
        super().__init__(lab, host, address, port)

    def handle(self, conn: socket.socket):
        command, *args = read_line(conn).decode().split()
        if command == "UP":
            conn.sendall(digest_until(conn, int(args[0])).encode() + b"\n")
        elif command == "UPEOF":
            conn.sendall(digest_until(conn, None).encode() + b"\n")
        elif command in ("DOWN", "DOWNHALF"):
            for chunk in pattern(int(args[0]), int(args[1])):
                conn.sendall(chunk)
            if command == "DOWNHALF":
                conn.shutdown(socket.SHUT_WR)
                received = b""
                while data := conn.recv(CHUNK):
                    received += data
                self.after_eof.append(received)
        elif command == "ECHO":
            while data := conn.recv(CHUNK):
                conn.sendall(data)


class BannerServer(_ThreadedServer):
    """Speaks first: sends ``banner`` at once, then echoes."""

    banner = b"220 relay-lab banner server ready\r\n"

    def handle(self, conn: socket.socket):
        conn.sendall(self.banner)
        while data := conn.recv(CHUNK):
            conn.sendall(data)
