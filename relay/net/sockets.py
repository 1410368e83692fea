"""Small socket helpers shared by the Trio code."""

import errno
import math
import os
import socket
import struct

import trio

from relay.addresses import is_ipv6

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


async def write_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``; an error is raised by the very call that got it, before any yield.

    A socket reports a reset to one call only, and later reads return 0. When
    another task reads that socket, the writer must be able to record the
    failure before that task runs and takes the 0 for an end of data; Trio's
    sock.send yields before it raises.
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(sock.fileno(), view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def closed_by_peer(sock: trio.socket.SocketType) -> bool:
    """Whether an idle connection was ended by its peer: a FIN, a reset, or bytes nobody asked
    for (either way it is not reusable). One non-blocking peek, no checkpoint."""
    borrowed = socket.socket(fileno=sock.fileno())
    try:
        return readable_now(borrowed)
    finally:
        borrowed.detach()


def readable_now(sock: socket.socket) -> bool:
    """Whether a read would not block: bytes, a FIN or a reset wait there. One non-blocking peek."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


async def receive_some(sock: trio.socket.SocketType, size: int, deadline: float = math.inf) -> bytes | None:
    """``await sock.recv(size)``, without a pass through Trio's scheduler when bytes are already there;
    None if Trio's clock reaches ``deadline`` first.

    Trio's socket methods yield even when the call succeeds at once: a
    scheduler pass per call, a sizeable part of the relay's CPU per short
    connection (sniffing, handshake). This yields only to wait, and sees
    cancellation whenever it does (``write_all`` writes the same way); the
    deadline's cancel scope, too, is only made when it has to wait.
    """
    fd = sock.fileno()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        if deadline == math.inf:
            await trio.lowlevel.wait_readable(fd)
            continue
        with trio.move_on_at(deadline) as waiting:
            await trio.lowlevel.wait_readable(fd)
        if waiting.cancelled_caught:
            return None


def family_of(host: str) -> int:
    """The socket family for an address literal."""
    return socket.AF_INET6 if is_ipv6(host) else socket.AF_INET


def is_local_address(host: str) -> bool:
    """True if ``host`` is one of this machine's addresses (binding to it succeeds)."""
    with socket.socket(family_of(host), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
