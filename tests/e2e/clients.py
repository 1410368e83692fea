"""Client-side helpers: connections from the lab's client host, through the router."""

import hashlib
import socket
import time

from relay.lab import ADDR
from relay.lab.servers import CHUNK, pattern_sha256

TRAFFIC_PORT = 7000


def connect(lab, address=ADDR.server4, port=TRAFFIC_PORT, timeout=30.0) -> socket.socket:
    return lab.connect("client", address, port, timeout=timeout)


def read_all(sock) -> tuple[int, str]:
    digest, count = hashlib.sha256(), 0
    while data := sock.recv(CHUNK):
        digest.update(data)
        count += len(data)
    return count, digest.hexdigest()


def download(lab, size, seed=1, address=ADDR.server4):
    with connect(lab, address) as sock:
        sock.sendall(f"DOWN {size} {seed}\n".encode())
        assert read_all(sock) == (size, pattern_sha256(size, seed))


def upload(lab, data: bytes, address=ADDR.server4):
    with connect(lab, address) as sock:
        sock.sendall(f"UP {len(data)}\n".encode())
        sock.sendall(data)
        assert sock.recv(100).strip().decode() == hashlib.sha256(data).hexdigest()


def echoing(lab, count: int) -> list[socket.socket]:
    """``count`` relayed connections to the echo server, each shown to work, held open for the caller."""
    held = []
    for _ in range(count):
        sock = connect(lab)
        held.append(sock)
        sock.sendall(b"ECHO\nhello")
        assert sock.recv(100) == b"hello"
    return held


def receive_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def expect_reset(sock, within: float) -> float:
    """Wait for the connection to be reset; returns how long it took."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(CHUNK):
            pass
    except ConnectionResetError:
        return time.monotonic() - started
    except TimeoutError:
        raise AssertionError(f"no reset within {within} s") from None
    raise AssertionError("the connection ended with a FIN, not a reset")


def connect_expecting_reset(lab, host, address, port, within: float) -> None:
    """Connect and wait for a reset, which may come so fast that connect() itself reports it."""
    try:
        sock = lab.connect(host, address, port, timeout=within)
    except ConnectionResetError:
        return
    with sock:
        expect_reset(sock, within)


def get_hello(lab, port: int, request: bytes) -> bytes:
    """Send ``request`` (a keep-alive GET /hello to the lab's HttpServer on ``port``) and read its response,
    then leave without closing first what the relay may keep of it."""
    with lab.connect("client", ADDR.server4, port, timeout=30) as sock:
        sock.sendall(request)
        response = b""
        while not response.endswith(b"hello from the lab server\n"):
            data = sock.recv(65536)
            assert data, response
            response += data
    assert response.startswith(b"HTTP/1.1 200")
    return response
