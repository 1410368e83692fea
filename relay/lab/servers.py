"""Servers on the lab's server host, run in threads of this process.

``TrafficServer`` speaks a one-line command protocol that lets a client check
integrity (sha256) and half-close in either direction; ``BannerServer`` speaks
first, like SSH or SMTP. Each connection gets a thread; every socket has a
timeout so a stuck peer cannot keep a thread alive forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import ssl
import threading

import h11

from relay.lab.netns import Lab
from relay.net.sockets import family_of

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
        self.listener = lab.socket(host, family_of(address))
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
        except (OSError, h11.ProtocolError) as exc:  # a client that left mid-request, e.g. curl on a failed test
            self.errors.append(repr(exc))

    def close(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(): close() alone would leave it listening
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
        self.preloaded: dict[tuple[int, int], bytes] = {}
        super().__init__(lab, host, address, port)

    def preload(self, size: int, seed: int) -> str:
        """Make ``DOWN size seed`` send bytes made beforehand (a benchmark's server then costs
        little CPU: making the pattern costs about 4 s per GB); returns their sha256."""
        data = b"".join(pattern(size, seed))
        self.preloaded[(size, seed)] = data
        return hashlib.sha256(data).hexdigest()

    def handle(self, conn: socket.socket):
        command, *args = read_line(conn).decode().split()
        if command == "UP":
            conn.sendall(digest_until(conn, int(args[0])).encode() + b"\n")
        elif command == "UPEOF":
            conn.sendall(digest_until(conn, None).encode() + b"\n")
        elif command in ("DOWN", "DOWNHALF"):
            size, seed = int(args[0]), int(args[1])
            if (size, seed) in self.preloaded:
                conn.sendall(self.preloaded[(size, seed)])
            else:
                for chunk in pattern(size, seed):
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


class HttpServer(_ThreadedServer):
    """HTTP/1.1 with keep-alive (h11), optionally over TLS. Paths:

    ``GET /blob/SIZE/SEED``  pattern(SIZE, SEED) with a Content-Length.
    ``GET /hello``           a short text.
    ``PUT|POST /sha256``     the sha256 of the request body, whatever its framing.
    ``GET /echo`` with ``Upgrade: echo`` or ``websocket``  101, then echoes raw bytes (a WebSocket stand-in).
    ``requests`` records (method, target, host header) of every request served.
    """

    def __init__(self, lab: Lab, host: str, address: str, port: int, tls: ssl.SSLContext | None = None):
        self.tls = tls
        self.requests: list[tuple[str, str, str]] = []
        super().__init__(lab, host, address, port)

    def handle(self, conn: socket.socket):
        # As nginx (tcp_nodelay on) and most servers: a head and a body written apart are not held
        # by Nagle for the proxy's delayed ACK (40 ms), which would hide any such stall downstream.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        http = h11.Connection(h11.SERVER)
        while True:
            request = self._next(http, conn)
            if not isinstance(request, h11.Request):
                return
            host = dict(request.headers).get(b"host", b"").decode()
            self.requests.append((request.method.decode(), request.target.decode(), host))
            body = hashlib.sha256()
            while isinstance(event := self._next(http, conn), h11.Data):
                body.update(event.data)
            if not isinstance(event, h11.EndOfMessage):
                return
            if (upgrade := dict(request.headers).get(b"upgrade")) in (b"echo", b"websocket"):
                conn.sendall(
                    http.send(
                        h11.InformationalResponse(
                            status_code=101, headers=[("Upgrade", upgrade), ("Connection", "Upgrade")]
                        )
                    )
                )
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
                return
            self._respond(http, conn, request, body.hexdigest())
            if http.our_state is h11.MUST_CLOSE:
                return
            http.start_next_cycle()

    @staticmethod
    def _next(http: h11.Connection, conn: socket.socket):
        while (event := http.next_event()) is h11.NEED_DATA:
            http.receive_data(conn.recv(CHUNK))
        return event

    def _respond(self, http, conn, request, body_sha256):
        target = request.target.decode()
        if target.startswith("/blob/"):
            size, seed = map(int, target.split("/")[2:4])
            conn.sendall(http.send(h11.Response(status_code=200, headers=[("Content-Length", str(size))])))
            if request.method != b"HEAD":
                for chunk in pattern(size, seed):
                    conn.sendall(http.send(h11.Data(data=chunk)))
        else:
            text = body_sha256 if target == "/sha256" else "hello from the lab server" if target == "/hello" else None
            status, body = (200, f"{text}\n".encode()) if text else (404, b"no such path\n")
            conn.sendall(http.send(h11.Response(status_code=status, headers=[("Content-Length", str(len(body)))])))
            if request.method != b"HEAD":
                conn.sendall(http.send(h11.Data(data=body)))
        conn.sendall(http.send(h11.EndOfMessage()))


def serve_https(lab: Lab, *names: str, ca_file: str = "ca.pem", host: str = "server", port: int = 443) -> str:
    """An HttpServer speaking TLS for ``names`` on ``host``, certified by a new CA; returns the file (in the
    lab's directory) of that CA, which clients must trust. Needs trustme (a test dependency)."""
    import trustme

    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(tls)
    path = str(lab.tmpdir / ca_file)
    ca.cert_pem.write_to_path(path)
    HttpServer(lab, host, "::", port, tls=tls)
    return path


class NxdomainDns:
    """A DNS server on UDP port 53 that knows no name: every query gets NXDOMAIN at once, except
    queries for the names in ``unanswered``, which get no answer at all.

    Daemons on a lab host then fail a lookup immediately, as with a real
    resolver, instead of waiting out their DNS timeouts; for an unanswered name
    they wait them out (squid: 30 s), as behind a resolver that drops queries.
    """

    def __init__(self, lab: Lab, host: str, address: str = "127.0.0.1", unanswered: frozenset[str] = frozenset()):
        self.unanswered = {name.lower() for name in unanswered}
        self.sock = lab.socket(host, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                query, client = self.sock.recvfrom(4096)
            except OSError:
                return  # closed at teardown
            if len(query) < 12 or question_name(query) in self.unanswered:
                continue
            # Same id and question; QR=1, RD copied, RA=1, RCODE=3 (NXDOMAIN); no answers.
            flags = bytes([0x80 | (query[2] & 0x01), 0x83])
            self.sock.sendto(query[:2] + flags + query[4:6] + b"\0\0\0\0\0\0" + query[12:], client)


def question_name(query: bytes) -> str:
    """The name a DNS query asks about (its first question), lowercased; "" if it cannot be read."""
    labels, offset = [], 12
    while offset < len(query) and query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    return ".".join(labels).lower()


class UdpEchoServer:
    """Echoes every UDP datagram to its sender, on ``address`` (``::``: IPv4 and IPv6 on one socket).

    ``peers`` records the (address, port) each datagram came from: through a SOCKS5 relay that is the
    proxy's, never the client's.
    """

    def __init__(self, lab: Lab, host: str, address: str, port: int):
        self.sock = lab.socket(host, family_of(address), socket.SOCK_DGRAM)
        if address == "::":
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind((address, port))
        self.peers: list[tuple[str, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(1 << 16)
                if peer is None:
                    return  # shut down at teardown
                self.peers.append(peer[:2])
                del self.peers[:-1000]  # bounded
                self.sock.sendto(data, peer)
            except OSError:
                if self.sock.fileno() < 0:
                    return  # closed at teardown
