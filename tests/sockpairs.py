"""Real TCP connection pairs on loopback for fast-path and pump tests."""

import socket
import struct


def tcp_pair(family=socket.AF_INET) -> tuple[socket.socket, socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname()[:2])
        b, _ = listener.accept()
    return a, b


def hard_close(sock: socket.socket) -> None:
    """Close with a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
