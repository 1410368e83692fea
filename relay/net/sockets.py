"""Small socket helpers shared by the Trio code."""

import errno
import socket
import struct

import trio

# Errors that mean the peer reset or vanished, rather than a bug of ours.
PEER_GONE = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
)

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: trio.socket.SocketType) -> None:
    """Close with a TCP RST instead of a FIN, so the peer sees a failure, not an end of data."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead: closing is all that is left to do
    sock.close()


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def format_address(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local_address(host: str) -> bool:
    """True if ``host`` is one of this machine's addresses (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
