"""Listening sockets and the accept loop."""

import errno
import math
import select
import socket

import trio

from relay import fastpath
from relay.addresses import format_address
from relay.config import DEFAULT_PORT, ConfigError
from relay.ends import errno_word
from relay.logs import RateLimited
from relay.net.sockets import family_of

DEFAULT_LISTEN = [("0.0.0.0", DEFAULT_PORT), ("::", DEFAULT_PORT)]
BACKLOG = 1024
# Out of fds or memory: accept() would fail again at once, so pause instead of spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 0.1
# The client gave up between its SYN and our accept(): nothing to serve, nothing wrong with us.
CLIENT_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET})
# Connections accepted in a row without waiting before the loop lets other tasks run.
ACCEPT_BATCH = 16
# With every slot taken, how often to look for a client waiting in the backlog (to reclaim a slot).
RECLAIM_POLL = 0.05


async def open_listener(host: str, port: int, transparent: bool, reuse_port: bool = False) -> socket.socket:
    """A listening non-blocking (stdlib) socket: accept_loop accepts without a scheduler pass each."""
    family = family_of(host)
    listener = socket.socket(family, socket.SOCK_STREAM)
    sock = trio.socket.from_stdlib_socket(listener)  # for its bind(), which resolves the address in a thread
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # An urgent (MSG_OOB) byte stays in the stream, relayed in its place (accepted sockets inherit this).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        if reuse_port:  # --workers: each process has its own listener, the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0 gets its own socket
        if transparent:
            try:
                fastpath.set_transparent(sock)
            except PermissionError:
                raise ConfigError("--mode tproxy needs CAP_NET_ADMIN (run as root, or grant the capability)") from None
        await sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {format_address((host, port))}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return listener


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def open_listeners(
    addresses: list[tuple[str, int]], transparent: bool, reuse_port: bool = False
) -> list[socket.socket]:
    if not addresses:
        addresses = [a for a in DEFAULT_LISTEN if ":" not in a[0] or ipv6_available()]
    listeners = []
    try:
        for host, port in addresses:
            listeners.append(await open_listener(host, port, transparent, reuse_port))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def client_waiting(listener) -> bool:
    """Whether a connection waits in ``listener``'s backlog."""
    poll = select.poll()
    poll.register(listener, select.POLLIN)
    return bool(poll.poll(0))


async def take_slot(listener, slots: trio.Semaphore, reclaim) -> None:
    """A slot for the next client: a free one, or, while every slot is taken and a client waits in
    the backlog, one that ``reclaim()`` frees (it says whether it could)."""
    while True:
        try:
            slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if reclaim is not None and client_waiting(listener) and reclaim():
            continue
        with trio.move_on_after(RECLAIM_POLL if reclaim is not None else math.inf):
            await slots.acquire()
            return


async def accept_loop(
    listener, accepted, warnings: RateLimited, slots: trio.Semaphore | None = None, reclaim=None
) -> None:
    """Accept forever, handing each connection to ``accepted(conn, peer)``: a plain function that
    takes the (stdlib) socket and starts whatever handles it.

    With ``slots``, one is taken before each accept and whoever has the
    connection must give it back: past the budget, new clients wait in the kernel's backlog instead of
    being accepted and then failing for lack of fds, unless ``reclaim()`` frees a slot for them
    (see take_slot).

    ``listener`` is a non-blocking stdlib socket (open_listener). While
    connections are waiting, up to ACCEPT_BATCH are accepted in a row: Trio's
    accept() and Semaphore.acquire() would each take a scheduler pass per
    connection. Cancellation is seen at every wait and after every batch.
    """
    in_a_row = 0
    while True:
        if slots is not None:
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                in_a_row = 0
                await take_slot(listener, slots, reclaim)
        try:
            while True:
                try:
                    conn, peer = listener.accept()
                    break
                except BlockingIOError:
                    in_a_row = 0
                    await trio.lowlevel.wait_readable(listener)
        except BaseException as exc:
            if slots is not None:
                slots.release()
            if not isinstance(exc, OSError):
                raise
            if exc.errno in RESOURCE_ERRNOS:
                warnings.warning(
                    "accept-" + errno_word(exc.errno),
                    f"accept() failed: {exc.strerror}; pausing {ACCEPT_PAUSE:g} s (raise the fd limit?)",
                )
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if exc.errno in CLIENT_GONE_ERRNOS:
                continue
            raise
        accepted(conn, peer)
        in_a_row += 1
        if in_a_row == ACCEPT_BATCH:
            in_a_row = 0
            await trio.lowlevel.checkpoint()
