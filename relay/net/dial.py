"""Opening the upstream side: TCP connect (with SO_MARK), then the proxy handshake."""

import errno
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

import trio

from relay.addresses import format_address
from relay.config import TlsOptions, Upstream
from relay.logs import log
from relay.net.faults import (
    Fault,
    UpstreamError,
    cancelled,
    cannot_watch,
    closed_in_handshake,
    closed_in_tls_handshake,
    connect_failure,
    connect_timed_out,
    handshake_failure,
    handshake_timed_out,
    internal_error,
)
from relay.net.readiness import ReadinessLoop, Timer
from relay.net.sockets import family_of, reset
from relay.net.tls import TlsSession, TlsSocket, client_context
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.http_connect import HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client, Socks5UdpAssociate
from relay.proto.tls import TlsHandshake

if TYPE_CHECKING:
    from relay.net.preconnect import Preconnector

SO_MARK = getattr(socket, "SO_MARK", 36)
# How a proxy's end of a pre-opened connection shows when the handshake begins on it.
STALE_POOLED = frozenset({"proxy-closed", "proxy-econnreset", "proxy-epipe"})
RECV_SIZE = 16384  # handshake reads; the machines bound the total


def handshake_for(
    upstream: Upstream,
    host: str,
    port: int,
    pipelined: bool = False,
    early_data: bytes = b"",
    udp_associate: bool = False,
):
    """The sans-IO machine asking ``upstream`` for a tunnel to host:port, or None for direct;
    ``pipelined``: a SOCKS5 handshake's messages all at once; ``early_data``: bytes for the
    destination sent right after an HTTP CONNECT request; ``udp_associate``: a SOCKS5 UDP
    ASSOCIATE instead of a tunnel (host and port unused)."""
    password = upstream.password.reveal() if upstream.password else None
    if udp_associate:
        return Socks5UdpAssociate(upstream.username, password, pipelined)
    if upstream.protocol == "http":
        machine = HttpConnectClient(host, port, username=upstream.username, password=password, early_data=early_data)
        if upstream.scheme == "https":  # the CONNECT inside TLS to the proxy
            context = client_context(upstream.tls or TlsOptions())
            return TlsHandshake(TlsSession(context, upstream.server_name), machine)
        return machine
    if upstream.scheme == "socks5":
        return Socks5Client(host, port, username=upstream.username, password=password, pipelined=pipelined)
    if upstream.scheme in ("socks4", "socks4a"):
        return Socks4Client(host, port, user_id=upstream.username or "", use_4a=upstream.scheme == "socks4a")
    return None


def apply_mark(sock, mark: int) -> None:
    """SO_MARK, any 32-bit mark: Python's setsockopt() takes an int only below 2**31."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", mark))


async def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for each address of host:port; raises OSError."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def new_socket(family: int, mark: int | None) -> socket.socket:
    """A non-blocking TCP socket for an upstream connection; the caller closes it if this raises."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        if mark is not None:
            apply_mark(sock, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # as the listener: urgent bytes in place
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(addresses: list[tuple[int, tuple]], *, mark: int | None, timeout: float) -> trio.socket.SocketType:
    """A connected TCP socket to the first of ``addresses`` that answers, within ``timeout`` in all.

    For one-off connections (health checks, probes, plain HTTP forwarding);
    relayed connections open theirs through the Dialer, without a task.
    """
    where = format_address(addresses[0][1])
    last_error = None
    deadline = trio.current_time() + timeout
    try:
        for family, address in addresses:
            sock = new_socket(family, mark)
            try:
                await connect_now(sock, address, deadline)
                return trio.socket.from_stdlib_socket(sock)
            except OSError as exc:
                sock.close()
                last_error = exc
            except BaseException:
                sock.close()
                raise
    except trio.TooSlowError:
        raise connect_timed_out(where, timeout) from None
    except OSError as exc:  # socket() itself failed: out of fds or memory
        last_error = exc
    raise connect_failure(last_error, where)


# connect() on a non-blocking socket: what Trio's sock.connect() takes for "started, wait until writable".
IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})


def connected_at_once(sock: socket.socket, address) -> bool:
    """Start connecting; True if already connected. Raises OSError if it failed at once.

    Over loopback (a proxy on this router, an ssh tunnel's local end) the TCP
    handshake is usually complete by the time connect() returns EINPROGRESS:
    then getpeername() succeeds and there is nothing to wait for.
    """
    error = sock.connect_ex(address)
    if error in IN_PROGRESS:
        try:
            sock.getpeername()
            return True
        except OSError:
            return False  # not yet: wait until writable
    if error:
        raise OSError(error, os.strerror(error))
    return True


async def connect_now(sock: socket.socket, address, deadline: float) -> None:
    """Trio's ``sock.connect(address)`` for a resolved address, without its scheduler pass (or even
    a cancel scope for the deadline) when the connection is made or fails at once; TooSlowError if
    it must wait past ``deadline`` (Trio's clock)."""
    if connected_at_once(sock, address):
        return
    with trio.fail_at(deadline):
        await trio.lowlevel.wait_writable(sock)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


class Dialing:
    """One upstream connection being opened by a Dialer: connecting to ``addresses`` in turn, then
    the proxy handshake (``machine``; None for a direct connection), and, if ``on_slow`` is set,
    a call to it once the proxy has not answered for ``slow_after`` seconds. ``may_fall_back``: a
    pipelined SOCKS5 handshake to a proxy not known to take one, which, failing while pipelining
    may be why, is tried once more one message at a time (``fell_back``). ``pooled``: (pool, opened at)
    while its socket, from the Preconnector, has not finished a handshake: if the proxy closes it
    meanwhile, the dial starts again on a new connection (``fresh``: never one from the pool)."""

    __slots__ = (
        "upstream",
        "target",
        "early_data",
        "udp_associate",
        "bound_address",
        "may_fall_back",
        "fell_back",
        "pooled",
        "fresh",
        "addresses",
        "machine",
        "mark",
        "connect_timeout",
        "handshake_timeout",
        "on_open",
        "on_fail",
        "slow_after",
        "on_slow",
        "sock",
        "next_address",
        "last_error",
        "handshaking",
        "outgoing",
        "timer",
    )

    def __init__(self, upstream, addresses, machine, mark, timeouts, on_open, on_fail, on_slow=None, target=None):
        self.upstream, self.addresses, self.machine, self.mark = upstream, addresses, machine, mark
        self.target = target
        self.early_data = b""  # sent with an HTTP CONNECT, by every connection it makes (see _start_again)
        self.udp_associate = False  # a SOCKS5 UDP ASSOCIATE, not a tunnel
        self.bound_address: tuple[str, int] | None = None  # the UDP relay address its reply named
        self.may_fall_back = self.fell_back = self.fresh = False
        self.pooled = None
        self.connect_timeout, self.handshake_timeout, self.slow_after = timeouts
        self.on_open, self.on_fail, self.on_slow = on_open, on_fail, on_slow
        self.sock: socket.socket | None = None  # None once it opened, failed or was cancelled
        self.next_address = 0
        self.last_error: OSError | None = None
        self.handshaking = False
        self.outgoing = b""  # handshake bytes the socket did not take yet
        self.timer: Timer | None = None  # the time limit of the current phase; None while nothing waits

    @property
    def under_way(self) -> bool:
        """Neither opened, failed nor cancelled yet (its callbacks may have been called inside open())."""
        return self.sock is not None


class Dialer:
    """Opens upstream connections without a task each: one ReadinessLoop, one task (``run``).

    A relayed connection used to open its upstream in its own task: a Trio
    wait (and an epoll registration, and a scheduler pass) for the connect and
    for every reply of the proxy, which cost more than the rest of the
    connection's Python. Here a connection being opened is a watched socket and
    a timer in the loop; the handshake machine is driven from the readiness
    calls, and the caller hears the outcome through one of two
    callbacks, called from ``open()`` itself when nothing had to wait:

    - ``on_open(sock, early)``: a connected non-blocking stdlib socket, whose
      other end is the destination, and the bytes that followed the proxy's
      reply (the start of the tunnel); the caller owns the socket;
    - ``on_fail(error)``: an UpstreamError, the socket already reset;

    and, if given, ``on_slow()`` once the proxy, connected, has not given its
    final answer within ``slow_after`` seconds: the dial goes on, with the
    handshake's own deadline.
    """

    def __init__(self, preconnect: "Preconnector | None" = None):
        self._loop = ReadinessLoop()
        self.preconnect = preconnect  # connections to proxies opened ahead of their clients
        self._dialing: dict[int, Dialing] = {}  # fd -> the connection being opened on it (and watched)
        # Each SOCKS5 upstream's answer to a pipelined handshake: True (took it), False (failed it, then took one
        # message at a time). One not here yet is tried pipelined, and falls back if that fails.
        self.pipelining: dict[Upstream, bool] = {}

    def __len__(self) -> int:
        return len(self._dialing)

    @property
    def closed(self) -> bool:
        return self._loop.closed

    def open(
        self,
        upstream: Upstream,
        addresses: list[tuple[int, tuple]],
        target: tuple[str, int],
        *,
        mark: int | None,
        connect_timeout: float,
        handshake_timeout: float,
        on_open,
        on_fail,
        slow_after: float | None = None,
        on_slow=None,
        early_data: bytes = b"",
        udp_associate: bool = False,
    ) -> Dialing:
        """Open a connection to ``target`` through ``upstream`` (at ``addresses``, resolved once);
        ``early_data`` (HTTP CONNECT only): the destination's first bytes, sent with the request;
        ``udp_associate`` (SOCKS5 only): a UDP ASSOCIATE's control connection instead (no target)."""
        host, port = target
        machine = None
        timeouts = connect_timeout, handshake_timeout, slow_after
        pipelined = upstream.scheme == "socks5" and self.pipelining.get(upstream) is not False
        if upstream.scheme == "direct":
            addresses = [(family_of(host), target)]
        else:
            try:
                machine = handshake_for(upstream, host, port, pipelined, early_data, udp_associate)
            except LocalProtocolError as exc:  # e.g. an IPv6 destination through SOCKS4
                dialing = Dialing(upstream, addresses, None, mark, timeouts, on_open, on_fail)
                self._call(on_fail, UpstreamError(str(exc), "unsupported-destination", Fault.TARGET))
                return dialing
        dialing = Dialing(upstream, addresses, machine, mark, timeouts, on_open, on_fail, on_slow, target)
        dialing.early_data = early_data
        dialing.udp_associate = udp_associate
        dialing.may_fall_back = pipelined and upstream not in self.pipelining
        if self.closed:
            self._call(on_fail, cancelled())
            return dialing
        self._step(self._connect_next, dialing)
        return dialing

    async def open_async(
        self,
        upstream: Upstream,
        addresses,
        target,
        *,
        mark: int | None,
        connect_timeout: float,
        handshake_timeout: float,
        early_data: bytes = b"",
    ) -> tuple[socket.socket, bytes]:
        """``open()`` for a task: the socket and the early bytes, or raises UpstreamError."""
        sock, early, _ = await self._open_and_wait(
            upstream,
            addresses,
            target,
            mark=mark,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            early_data=early_data,
        )
        return sock, early

    async def associate_udp(
        self, upstream: Upstream, addresses, *, mark: int | None, connect_timeout: float, handshake_timeout: float
    ) -> tuple[socket.socket, tuple[str, int]]:
        """A SOCKS5 UDP ASSOCIATE's control connection, from the pool and pipelined like any other
        SOCKS5 dial: the socket and the relay address the proxy named; raises UpstreamError."""
        sock, early, dialing = await self._open_and_wait(
            upstream,
            addresses,
            ("0.0.0.0", 0),
            mark=mark,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            udp_associate=True,
        )
        if early:  # RFC 1928 has nothing for the proxy to send on a control connection
            reset(sock)
            message = "the proxy sent bytes after its UDP ASSOCIATE reply"
            raise UpstreamError(message, "proxy-protocol-error", Fault.PROXY)
        return sock, dialing.bound_address

    async def _open_and_wait(self, upstream, addresses, target, **options) -> tuple[socket.socket, bytes, Dialing]:
        """``open()`` awaited: the socket, the early bytes and the (finished) Dialing."""
        outcome: list = []
        done = trio.Event()

        def finished(*result):
            outcome.extend(result)
            done.set()

        dialing = self.open(upstream, addresses, target, on_open=finished, on_fail=finished, **options)
        try:
            await done.wait()
        except BaseException:
            self.cancel(dialing)
            if len(outcome) == 2:
                reset(outcome[0])
            raise
        if len(outcome) == 1:
            raise outcome[0]
        return outcome[0], outcome[1], dialing

    def cancel(self, dialing: Dialing) -> None:
        """Stop opening (the socket is reset, no callback); nothing if it is over already."""
        if dialing.sock is not None:
            reset(self._finish(dialing))

    async def run(self) -> None:
        """Drive every connection being opened until close(), or until cancelled (then close())."""
        try:
            await self._loop.run()
        finally:
            self.close()

    def close(self) -> None:
        """Fail every connection still being opened (reason "cancelled"), and every later open()."""
        if self.closed:
            return
        self._loop.close()  # wakes run(), if it waits
        left = list(self._dialing.values())
        self._dialing = {}
        for dialing in left:
            self._fail(dialing, cancelled())

    # -- the phases of one connection ----------------------------------------------

    def _connect_next(self, dialing: Dialing) -> None:
        """Connect to the next address; on to the handshake if that is done at once."""
        while dialing.next_address < len(dialing.addresses):
            family, address = dialing.addresses[dialing.next_address]
            dialing.next_address += 1
            if self.preconnect is not None and dialing.machine is not None and not dialing.fresh:
                lent = self.preconnect.take(dialing.upstream, family, address, dialing.mark)
                if lent is not None:
                    dialing.sock, dialing.pooled = lent[0], lent[1:]
                    if isinstance(dialing.sock, TlsSocket):  # its TLS handshake done ahead too
                        dialing.machine.adopt(dialing.sock.session)
                    self._connected(dialing)
                    return
            try:
                sock = new_socket(family, dialing.mark)
            except OSError as exc:  # out of fds or memory: another address will not help
                dialing.last_error = exc
                break
            dialing.sock = sock
            try:
                connected = connected_at_once(sock, address)
            except OSError as exc:
                dialing.sock = None
                sock.close()
                dialing.last_error = exc
                continue
            if connected:
                self._connected(dialing)
                return
            if dialing.timer is None:  # one connect timeout for all the addresses
                self._set_deadline(dialing, dialing.connect_timeout)
            self._watch(dialing, select.EPOLLOUT)
            return
        dialing.sock = None
        where, direct = format_address(dialing.addresses[0][1]), dialing.machine is None
        self._fail(dialing, connect_failure(dialing.last_error, where, direct=direct))

    def _connected(self, dialing: Dialing) -> None:
        if dialing.machine is None:
            self._opened(dialing, b"")
            return
        dialing.handshaking = True
        if dialing.on_slow is not None and dialing.slow_after < dialing.handshake_timeout:
            # One timer at a time: the call for a slow answer, which then sets the handshake's deadline.
            self._drop_deadline(dialing)  # the connect timeout's
            now = trio.current_time()
            deadline = now + dialing.handshake_timeout
            dialing.timer = self._loop.call_at(now + dialing.slow_after, self._step, self._slow, dialing, deadline)
        else:
            self._set_deadline(dialing, dialing.handshake_timeout)
        dialing.outgoing = dialing.machine.data_to_send()
        self._handshake(dialing, readable=False)

    def _ready(self, dialing: Dialing) -> None:
        if dialing.handshaking:
            self._handshake(dialing, readable=True)
            return
        error = dialing.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            self._connected(dialing)
            return
        self._forget(dialing)
        dialing.sock.close()
        dialing.last_error = OSError(error, os.strerror(error))
        self._connect_next(dialing)

    def _handshake(self, dialing: Dialing, readable: bool) -> None:
        """Read what came (when ``readable``: one read, the epoll is level-triggered), send what
        is queued; done once the machine is established and everything went out."""
        machine, fd = dialing.machine, dialing.sock.fileno()
        try:
            if readable:
                try:
                    data = os.read(fd, RECV_SIZE)
                except BlockingIOError:
                    data = None  # woken to send
                if data is not None:
                    if not data:
                        if isinstance(machine, TlsHandshake) and not machine.secure:
                            raise closed_in_tls_handshake()
                        raise closed_in_handshake()
                    machine.receive_data(data)
                    dialing.outgoing += machine.data_to_send()
            if dialing.outgoing:
                try:
                    dialing.outgoing = dialing.outgoing[os.write(fd, dialing.outgoing) :]
                except BlockingIOError:
                    pass
        except (UpstreamError, RemoteProtocolError, OSError) as exc:
            self._handshake_failed(dialing, handshake_failure(exc))
            return
        if machine.established and not dialing.outgoing:
            self._opened(dialing, machine.trailing_data)
            return
        self._watch(dialing, select.EPOLLIN | (select.EPOLLOUT if dialing.outgoing else 0))

    def _slow(self, dialing: Dialing, deadline: float) -> None:
        dialing.timer = self._loop.call_at(deadline, self._step, self._timed_out, dialing)
        on_slow, dialing.on_slow = dialing.on_slow, None
        self._call(on_slow)

    def _handshake_failed(self, dialing: Dialing, error: UpstreamError) -> None:
        """The proxy failed the handshake: ``error``, unless the connection had gone stale in the pool or
        it may have been the pipelining (see Dialing): then the dial starts again on a new connection."""
        if dialing.pooled is not None and error.reason in STALE_POOLED:
            self.preconnect.went_stale(*dialing.pooled)
            dialing.pooled = None
            self._start_again(dialing, pipelined=dialing.may_fall_back or self.pipelining.get(dialing.upstream, False))
        elif dialing.may_fall_back and dialing.machine.pipelining_unconfirmed:
            dialing.may_fall_back, dialing.fell_back = False, True
            self._start_again(dialing, pipelined=False)
        else:
            self._fail(dialing, error)

    def _start_again(self, dialing: Dialing, pipelined: bool) -> None:
        """Reset its socket and dial once more from the first address, never from the pool."""
        self._forget(dialing)
        reset(dialing.sock)
        self._drop_deadline(dialing)
        dialing.sock, dialing.handshaking, dialing.outgoing, dialing.next_address = None, False, b"", 0
        dialing.machine = handshake_for(
            dialing.upstream, *dialing.target, pipelined, dialing.early_data, dialing.udp_associate
        )
        dialing.fresh = True
        self._connect_next(dialing)

    def _timed_out(self, dialing: Dialing) -> None:
        if dialing.handshaking:
            # Not a reason to try again one message at a time: a proxy that dropped pipelined bytes cannot be told
            # from one still connecting to a blackholed destination, and that would double every such timeout.
            self._fail(dialing, handshake_timed_out(dialing.handshake_timeout))
            return
        where, direct = format_address(dialing.addresses[0][1]), dialing.machine is None
        self._fail(dialing, connect_timed_out(where, dialing.connect_timeout, direct=direct))

    def _opened(self, dialing: Dialing, early: bytes) -> None:
        upstream = dialing.upstream
        # Dials begun before the first verdict all bring one: it is said once, when it changes.
        if dialing.fell_back and self.pipelining.get(upstream) is not False:
            self.pipelining[upstream] = False
            log.info(
                "upstream %s failed a pipelined SOCKS5 handshake and took one message at a time: so from now on",
                upstream,
            )
        elif dialing.may_fall_back and not dialing.fell_back and upstream not in self.pipelining:
            self.pipelining[upstream] = True
            log.info("upstream %s took a pipelined SOCKS5 handshake: so from now on", upstream)
        on_open, machine = dialing.on_open, dialing.machine
        if dialing.udp_associate:
            dialing.bound_address = machine.bound_address
        sock = self._finish(dialing)
        if isinstance(machine, TlsHandshake):  # the session goes on with the socket
            sock = TlsSocket.adopt(sock, machine.session)
        self._call(on_open, sock, early)

    def _fail(self, dialing: Dialing, error: UpstreamError) -> None:
        """Reset its socket (if it has one) and report ``error``, unless it was reported on already."""
        on_fail = dialing.on_fail
        if dialing.sock is not None:
            reset(self._finish(dialing))
        else:
            self._drop_deadline(dialing)
        dialing.machine = dialing.on_open = dialing.on_fail = dialing.on_slow = None
        if on_fail is not None:
            self._call(on_fail, error)

    # -- bookkeeping ------------------------------------------------------------------

    def _step(self, step, dialing: Dialing, *args) -> None:
        """``step(dialing, *args)``: a bug in it (in a handshake machine) must cost this connection only,
        and end it once."""
        try:
            step(dialing, *args)
        except Exception:
            log.exception("internal error while opening an upstream connection")
            self._fail(dialing, internal_error())

    def _watch(self, dialing: Dialing, events: int) -> None:
        """Wait for ``events`` on its socket; if the epoll cannot take it (its watch limit, memory),
        the dial fails as the relay's own shortage, not the proxy's."""
        fd = dialing.sock.fileno()
        try:
            self._loop.watch(fd, events, self._step, self._ready, dialing)
        except OSError as exc:
            self._fail(dialing, cannot_watch(exc))
            return
        self._dialing[fd] = dialing

    def _finish(self, dialing: Dialing) -> socket.socket:
        """Its socket, out of the loop; the rest let go."""
        self._forget(dialing)
        sock, dialing.sock = dialing.sock, None
        dialing.machine = dialing.on_open = dialing.on_fail = dialing.on_slow = None
        self._drop_deadline(dialing)
        return sock

    def _drop_deadline(self, dialing: Dialing) -> None:
        if dialing.timer is not None:
            self._loop.cancel(dialing.timer)
            dialing.timer = None

    def _forget(self, dialing: Dialing) -> None:
        fd = dialing.sock.fileno()
        if self._dialing.get(fd) is dialing:
            del self._dialing[fd]
            self._loop.unwatch(fd)

    def _set_deadline(self, dialing: Dialing, timeout: float) -> None:
        self._drop_deadline(dialing)  # the connect timeout's, now that the handshake's replaces it
        dialing.timer = self._loop.call_at(trio.current_time() + timeout, self._step, self._timed_out, dialing)

    @staticmethod
    def _call(callback, *args) -> None:
        try:
            callback(*args)
        except Exception:  # a bug must cost one connection, not every connection being opened
            log.exception("internal error after opening an upstream connection")
