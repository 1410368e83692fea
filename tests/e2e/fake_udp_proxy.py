"""A scripted SOCKS5 proxy for UDP fault cases: it takes UDP ASSOCIATE (naming 0.0.0.0 as its relay
address, which means its own), and answers each datagram of the relay's with garbage first, then, sent
from another port (a stranger), a well-formed reply, then the real echo. A payload of ``close`` makes it
close the control connection instead, ``reset`` reset it."""

import socket
import struct
import threading

from relay.udp.datagram import decode, encode
from tests.e2e.fake_proxy import _read_exactly

# What comes before each echo, from the relay address: none of it may reach the client.
GARBAGE = (
    b"\0",  # shorter than any header
    b"\0\0\0\x09" + bytes(6) + b"bad address type",
    b"\x01\0\0\x01" + bytes(6) + b"reserved bytes set",
    b"\0\0\0\x03\x07example\0\x35from a name",
)


def fragment(host: str, port: int, payload: bytes) -> bytes:
    whole = encode(host, port, payload)
    return whole[:2] + b"\x01" + whole[3:]


class FakeUdpProxy:
    def __init__(self, lab, host: str, address: str, port: int):
        self.listener = lab.socket(host)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(16)
        self.relay = lab.socket(host, socket.AF_INET, socket.SOCK_DGRAM)
        self.relay.bind((address, 0))
        self.stranger = lab.socket(host, socket.AF_INET, socket.SOCK_DGRAM)
        self.stranger.bind((address, 0))
        self.controls: list[socket.socket] = []
        self.closing = False
        self.url = f"socks5://{address}:{port}"
        threading.Thread(target=self._accept_loop, daemon=True).start()
        threading.Thread(target=self._relay_loop, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
                conn.settimeout(10)
                _, methods = _read_exactly(conn, 2)
                _read_exactly(conn, methods)
                conn.sendall(b"\x05\x00")
                if _read_exactly(conn, 10)[:4] != b"\x05\x03\x00\x01":
                    conn.close()
                    continue
                port = self.relay.getsockname()[1]
                conn.sendall(b"\x05\x00\x00\x01" + bytes(4) + port.to_bytes(2, "big"))  # 0.0.0.0: "my address"
                self.controls.append(conn)
            except OSError:
                if self.listener.fileno() < 0:
                    return

    def _relay_loop(self):
        while True:
            try:
                message, relay = self.relay.recvfrom(1 << 16)
            except OSError:
                return
            if self.closing:
                return
            host, port, payload = decode(message)
            if payload in (b"close", b"reset"):
                for conn in self.controls:
                    if payload == b"reset":  # an RST, not a FIN
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                self.controls.clear()
                continue
            for garbage in GARBAGE:
                self.relay.sendto(garbage, relay)
            self.relay.sendto(fragment(host, port, b"a fragment"), relay)
            self.stranger.sendto(encode(host, port, b"from a stranger"), relay)
            self.relay.sendto(encode(host, port, payload), relay)

    def close(self):
        self.closing = True
        for sock in (self.listener, self.relay, self.stranger, *self.controls):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it, so the ports are free at once
            except OSError:
                pass
            sock.close()
