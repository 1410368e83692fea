"""Pure-Python twin of ``relay/_fastpath.pyx``: same functions, same Flow API.

Used when the extension is not built or RELAY_NO_EXTENSIONS=1. Instead of a
pipe, Flow copies through one bounded buffer, drained before the next read,
so it behaves exactly like the splice version, one copy slower.
"""

import os
import socket
import struct

from relay._fastpath_common import AGAIN, EOF, WANT_READ, WANT_WRITE, FlowError

NAME = "python"

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>
IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>
DEFAULT_BUFFER = 65536  # the kernel's default pipe size, so both twins buffer alike


def original_dst(sock):
    """The address a REDIRECTed connection was sent to, as (host, port)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntop(socket.AF_INET, packed), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return socket.inet_ntop(socket.AF_INET6, packed), port


def set_transparent(sock):
    """Let a TPROXY listener accept connections addressed to any IP (needs CAP_NET_ADMIN)."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)


POOL_MAX = 64
# Empty buffers kept for the next connection, as the extension keeps empty pipes.
_pool: list[memoryview] = []


def pooled_pipes():
    """How many empty buffers wait for reuse (for tests)."""
    return len(_pool)


class Flow:
    """One direction of a relayed connection: socket -> buffer -> socket.

    The buffer is allocated on the first step, so an idle connection holds none.
    """

    __slots__ = ("pending", "eof", "capacity", "_view", "_start")

    def __init__(self, pipe_size=0):
        self.pending = 0
        self.eof = False
        self.capacity = pipe_size if pipe_size > 0 else DEFAULT_BUFFER
        self._view = None
        self._start = 0

    def close(self):
        """Release the buffer (to the pool if it is empty); bytes still in it are dropped."""
        if self._view is not None and self.pending == 0 and len(_pool) < POOL_MAX:
            _pool.append(self._view)
        self._view = None
        self.pending = 0

    def step(self, src, dst, budget):
        """Move bytes until something would block, EOF, or ``budget`` bytes moved.

        Returns (status, bytes written to dst); raises FlowError on a socket error
        (its ``moved`` is the bytes written to dst before it).
        """
        if self._view is None:
            pooled = _pool.pop() if _pool else None
            self._view = pooled if pooled is not None and len(pooled) == self.capacity else memoryview(bytearray(self.capacity))
        view = self._view
        moved = 0
        while True:
            while self.pending > 0:
                try:
                    n = os.write(dst, view[self._start : self._start + self.pending])
                except BlockingIOError:
                    return WANT_WRITE, moved
                except OSError as exc:
                    raise FlowError(exc.errno, False, moved) from None
                if n == 0:
                    return WANT_WRITE, moved
                self._start += n
                self.pending -= n
                moved += n
            if self.eof:
                return EOF, moved
            if moved >= budget:
                return AGAIN, moved
            try:
                n = os.readv(src, [view])
            except BlockingIOError:
                return WANT_READ, moved
            except OSError as exc:
                raise FlowError(exc.errno, True, moved) from None
            if n == 0:
                self.eof = True
                return EOF, moved
            self._start = 0
            self.pending = n
