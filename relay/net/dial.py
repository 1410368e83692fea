"""Opening the upstream side: TCP connect (with SO_MARK), then the proxy handshake."""

import errno
import socket

import trio

from relay.config import Upstream
from relay.net.sockets import format_address, reset, send_all
from relay.proto.errors import LocalProtocolError, ProxyRefused, RemoteProtocolError
from relay.proto.http_connect import HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client

SO_MARK = getattr(socket, "SO_MARK", 36)
RECV_SIZE = 16384  # handshake reads; the machines bound the total


class UpstreamError(Exception):
    """The tunnel could not be opened. ``reason`` is one short word for logs and metrics."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


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


async def connect(host: str, port: int, *, mark: int | None, timeout: float) -> trio.socket.SocketType:
    """A connected TCP socket to host:port, trying each resolved address in turn."""
    where = format_address((host, port))
    last_error = None
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for family, type_, proto, _, address in infos:
                sock = trio.socket.socket(family, type_, proto)
                try:
                    if mark is not None:
                        apply_mark(sock, mark)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await sock.connect(address)
                    return sock
                except OSError as exc:
                    sock.close()
                    last_error = exc
                except BaseException:
                    sock.close()
                    raise
    except trio.TooSlowError:
        raise UpstreamError(f"connecting to {where} timed out after {timeout:g} s", "connect-timeout") from None
    except OSError as exc:  # resolution failed
        raise UpstreamError(f"cannot resolve {host}: {exc.strerror or exc}", "resolve-failed") from None
    assert last_error is not None  # getaddrinfo never returns an empty list
    raise UpstreamError(
        f"connecting to {where} failed: {last_error.strerror}", "connect-" + _errno_word(last_error)
    )


async def run_handshake(sock: trio.socket.SocketType, machine, timeout: float) -> bytes:
    """Drive ``machine`` over ``sock``; returns the bytes that followed the proxy's success reply."""
    try:
        with trio.fail_after(timeout):
            await send_all(sock, machine.data_to_send())
            while not machine.established:
                machine.receive_data(await sock.recv(RECV_SIZE))
                reply = machine.data_to_send()
                if reply:
                    await send_all(sock, reply)
    except trio.TooSlowError:
        raise UpstreamError(f"proxy handshake timed out after {timeout:g} s", "handshake-timeout") from None
    except ProxyRefused as exc:
        raise UpstreamError(str(exc), exc.reason) from None
    except RemoteProtocolError as exc:
        raise UpstreamError(f"malformed reply from the proxy: {exc}", "proxy-protocol-error") from None
    except OSError as exc:
        raise UpstreamError(f"proxy connection failed: {exc.strerror}", "proxy-" + _errno_word(exc)) from None
    return machine.trailing_data


async def open_upstream(
    upstream: Upstream,
    destination: tuple[str, int],
    *,
    mark: int | None,
    connect_timeout: float,
    handshake_timeout: float,
) -> tuple[trio.socket.SocketType, bytes]:
    """A socket whose other end is ``destination`` (through the proxy), and bytes already received from it."""
    host, port = destination
    if upstream.scheme == "direct":
        return await connect(host, port, mark=mark, timeout=connect_timeout), b""
    try:
        machine = handshake_for(upstream, host, port)
    except LocalProtocolError as exc:  # e.g. an IPv6 destination through SOCKS4
        raise UpstreamError(str(exc), "unsupported-destination") from None
    sock = await connect(upstream.host, upstream.port, mark=mark, timeout=connect_timeout)
    try:
        return sock, await run_handshake(sock, machine, handshake_timeout)
    except BaseException:
        reset(sock)
        raise
