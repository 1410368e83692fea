"""Opening the upstream side: TCP connect (with SO_MARK), then the proxy handshake."""

import errno
import os
import socket

import trio

from relay.config import Upstream
from relay.net.sockets import format_address, receive_some, reset, write_all
from relay.proto.errors import LocalProtocolError, ProxyRefused, RemoteProtocolError
from relay.proto.http_connect import HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client

SO_MARK = getattr(socket, "SO_MARK", 36)
RECV_SIZE = 16384  # handshake reads; the machines bound the total


class UpstreamError(Exception):
    """The tunnel could not be opened. ``reason`` is one short word for logs and metrics.

    ``about_target`` is true when the proxy answered but could not reach or
    resolve what we asked for: asked for a hostname, asking by IP may still work.
    """

    def __init__(self, message: str, reason: str, about_target: bool = False):
        super().__init__(message)
        self.reason = reason
        self.about_target = about_target

    @property
    def proxy_fault(self) -> bool:
        """The proxy itself failed (unreachable, silent, garbled, or rejecting our credentials),
        as opposed to refusing this destination: this counts against its health."""
        return self.reason.startswith(("connect-", "proxy-e")) or self.reason in PROXY_FAULTS


LOCAL_SHORTAGES = frozenset({errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PROXY_FAULTS = frozenset(
    {"handshake-timeout", "proxy-protocol-error", "http-407", "socks5-auth-failed", "socks5-no-acceptable-method"}
)


def _about_target(refusal: ProxyRefused) -> bool:
    if refusal.reason.startswith("http-"):
        return refusal.reason != "http-407"  # a missing password is not fixed by an address
    return refusal.host_unreachable or refusal.reason == "socks5-general-failure"


def _errno_word(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, "error").lower() if exc.errno else "error"


def handshake_for(upstream: Upstream, host: str, port: int):
    """The sans-IO machine asking ``upstream`` for a tunnel to host:port, or None for direct."""
    password = upstream.password.reveal() if upstream.password else None
    if upstream.scheme == "http":
        return HttpConnectClient(host, port, username=upstream.username, password=password)
    if upstream.scheme == "socks5":
        return Socks5Client(host, port, username=upstream.username, password=password)
    if upstream.scheme in ("socks4", "socks4a"):
        return Socks4Client(host, port, user_id=upstream.username or "", use_4a=upstream.scheme == "socks4a")
    return None


def apply_mark(sock, mark: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def address_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for each address of host:port; raises OSError."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def connect(addresses: list[tuple[int, tuple]], *, mark: int | None, timeout: float) -> trio.socket.SocketType:
    """A connected TCP socket to the first of ``addresses`` that answers, within ``timeout`` in all."""
    where = format_address(addresses[0][1])
    last_error = None
    deadline = trio.current_time() + timeout
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                if mark is not None:
                    apply_mark(sock, mark)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await connect_now(sock, address, deadline)
                return trio.socket.from_stdlib_socket(sock)
            except OSError as exc:
                sock.close()
                last_error = exc
            except BaseException:
                sock.close()
                raise
    except trio.TooSlowError:
        raise UpstreamError(f"connecting to {where} timed out after {timeout:g} s", "connect-timeout") from None
    except OSError as exc:  # socket() itself failed: out of fds or memory
        last_error = exc
    reason = _errno_word(last_error)
    # Out of local ports, fds or memory is the relay's shortage, not the proxy's fault: it
    # must not mark a healthy upstream down (and so refuse everyone once ports free up).
    reason = ("relay-" if last_error.errno in LOCAL_SHORTAGES else "connect-") + reason
    why = os.strerror(last_error.errno) if last_error.errno else str(last_error)
    raise UpstreamError(f"connecting to {where} failed: {why}", reason)


# connect() on a non-blocking socket: what Trio's sock.connect() takes for "started, wait until writable".
IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})


async def connect_now(sock: socket.socket, address, deadline: float) -> None:
    """Trio's ``sock.connect(address)`` for a resolved address, without its scheduler pass when the
    connection is made at once (or fails at once) and without resolving the address again;
    TooSlowError if it must wait past ``deadline`` (Trio's clock).

    Over loopback (a proxy on this router, an ssh tunnel's local end) the TCP
    handshake is usually complete by the time connect() returns EINPROGRESS:
    then getpeername() succeeds and there is nothing to wait for, not even a
    cancel scope for the deadline (about 30 Python calls to enter and leave).
    """
    error = sock.connect_ex(address)
    if error in IN_PROGRESS:
        try:
            sock.getpeername()
            return
        except OSError:
            pass  # not yet: wait, as Trio does
        with trio.fail_at(deadline):
            await trio.lowlevel.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def run_handshake(sock: trio.socket.SocketType, machine, timeout: float) -> bytes:
    """Drive ``machine`` over ``sock``; returns the bytes that followed the proxy's success reply."""
    try:
        with trio.fail_after(timeout):
            await write_all(sock, machine.data_to_send())
            while not machine.established:
                data = await receive_some(sock, RECV_SIZE)
                if not data:  # e.g. ssh -D closes without a SOCKS reply when the far side fails
                    raise UpstreamError(
                        "the proxy closed the connection during the handshake", "proxy-closed", about_target=True
                    )
                machine.receive_data(data)
                reply = machine.data_to_send()
                if reply:
                    await write_all(sock, reply)
    except trio.TooSlowError:
        raise UpstreamError(f"proxy handshake timed out after {timeout:g} s", "handshake-timeout") from None
    except ProxyRefused as exc:
        raise UpstreamError(str(exc), exc.reason, _about_target(exc)) from None
    except RemoteProtocolError as exc:
        raise UpstreamError(f"malformed reply from the proxy: {exc}", "proxy-protocol-error") from None
    except OSError as exc:
        raise UpstreamError(f"proxy connection failed: {exc.strerror}", "proxy-" + _errno_word(exc)) from None
    return machine.trailing_data


async def open_upstream(
    upstream: Upstream,
    proxy_addresses: list[tuple[int, tuple]],
    destination: tuple[str, int],
    *,
    mark: int | None,
    connect_timeout: float,
    handshake_timeout: float,
) -> tuple[trio.socket.SocketType, bytes]:
    """A socket whose other end is ``destination`` (through the proxy at ``proxy_addresses``,
    resolved once at start), and the bytes already received from it."""
    host, port = destination
    if upstream.scheme == "direct":
        return await connect([(address_family(host), destination)], mark=mark, timeout=connect_timeout), b""
    try:
        machine = handshake_for(upstream, host, port)
    except LocalProtocolError as exc:  # e.g. an IPv6 destination through SOCKS4
        raise UpstreamError(str(exc), "unsupported-destination") from None
    sock = await connect(proxy_addresses, mark=mark, timeout=connect_timeout)
    try:
        return sock, await run_handshake(sock, machine, handshake_timeout)
    except BaseException:
        reset(sock)
        raise
