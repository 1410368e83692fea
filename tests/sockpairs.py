"""Real TCP connection pairs on loopback for fast-path and pump tests."""

import socket
import struct


def tcp_pair(family=socket.AF_INET, buffer_size=0) -> tuple[socket.socket, socket.socket]:
    """``buffer_size``: a's send buffer and b's receive buffer, set before they connect (so b's window stays small)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    a = socket.socket(family, socket.SOCK_STREAM)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if buffer_size:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)  # accept() passes it on
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        listener.bind((host, 0))
        listener.listen(1)
        a.connect(listener.getsockname()[:2])
        b, _ = listener.accept()
    return a, b


def hard_close(sock: socket.socket) -> None:
    """Close with a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
