"""The relay itself: listeners, per-connection handling, and shutdown on signals."""

import errno
import signal
import socket
import time

import trio

from relay import fastpath
from relay.config import Config, ConfigError
from relay.logs import RateLimited, conn_log, log
from relay.net.dial import UpstreamError, apply_mark, connect, open_upstream, resolve
from relay.net.http_forward import ForwardFailed, HttpForwarder, NeedsTunnel
from relay.net.listener import accept_loop, open_listeners
from relay.net.pump import pump
from relay.net.sockets import format_address, is_local_address, reset
from relay.proto.http_connect import basic_credentials
from relay.proto.sniff import HTTP, MAX_SNIFF_BYTES, NOT_RECOGNISED, Sniffed, Sniffer

WILDCARDS = ("0.0.0.0", "::")
# Upstreams that can be asked for a hostname (SOCKS4 and direct only take addresses).
NAMED_SCHEMES = ("http", "socks5", "socks4a")


class ConnectionRecord:
    """What the per-connection log line (-v) says about one connection."""

    __slots__ = ("peer", "dst", "name", "started", "retried", "up", "down", "http_requests")

    def __init__(self, peer, dst, name, started):
        self.peer, self.dst, self.name, self.started = peer, dst, name, started
        self.retried = None  # the proxy's reason for refusing the name, when we then asked by address
        self.up = self.down = 0
        self.http_requests = None  # forwarded in absolute form, when not tunnelled

    def log(self, upstream, ended: str, detail: str | None = None) -> None:
        line = f"conn client={format_address(self.peer)} dst={format_address(self.dst)}"
        if self.name:
            line += f" name={self.name}"
        if self.retried:
            line += f" retried-by-ip={self.retried}"
        if self.http_requests is not None:
            line += f" http-requests={self.http_requests}"
        line += (
            f" via={upstream} up={self.up} down={self.down}"
            f" time={time.monotonic() - self.started:.3f}s end={ended}"
        )
        if detail:
            line += f" error={detail!r}"
        conn_log.info("%s", line)


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.listeners: list[trio.socket.SocketType] = []
        self.listening: set[tuple[str, int]] = set()
        self.proxy_addresses: list[tuple[int, tuple]] = []  # resolved once, at start
        # Local addresses of our open upstream sockets: a client coming *from* one is our own traffic looped back.
        self.own_sources: set[tuple[str, int]] = set()
        self.warnings = RateLimited()
        # Plain HTTP clients get absolute-form forwarding instead of a CONNECT tunnel.
        self.forward_http = config.upstream.scheme == "http" and config.http_mode == "forward"

    async def open(self) -> None:
        """Bind the listeners and check capabilities; raises ConfigError with a user-facing message."""
        config = self.config
        if config.mark is not None:
            with socket.socket() as probe:
                try:
                    apply_mark(probe, config.mark)
                except PermissionError:
                    raise ConfigError("--mark needs CAP_NET_ADMIN (run as root, or grant the capability)") from None
        upstream = config.upstream
        if upstream.scheme != "direct":
            try:
                self.proxy_addresses = await resolve(upstream.host, upstream.port)
            except OSError as exc:
                raise ConfigError(f"cannot resolve upstream host {upstream.host!r}: {exc.strerror}") from None
        self.listeners = await open_listeners(config.listen, transparent=config.mode == "tproxy")
        self.listening = {sock.getsockname()[:2] for sock in self.listeners}

    def original_destination(self, conn) -> tuple[str, int]:
        if self.config.mode == "tproxy":
            return conn.getsockname()[:2]
        try:
            return fastpath.impl.original_dst(conn)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return conn.getsockname()[:2]  # not NATed: the client connected to our port itself

    def loop_reason(self, peer: tuple[str, int], dst: tuple[str, int]) -> str | None:
        """Why this connection must not be relayed, if it is a loop or aimed at the relay itself."""
        if peer in self.own_sources:
            return "it comes from the relay's own upstream connection (a routing loop: exempt --mark traffic)"
        if any(dst == address[:2] for _, address in self.proxy_addresses):
            return "its destination is the upstream proxy itself (a routing loop: exempt --mark traffic)"
        for host, port in self.listening:
            if dst[1] == port and (dst[0] == host or (host in WILDCARDS and is_local_address(dst[0]))):
                return "its destination is the relay's own listening port"
        return None

    async def handle(self, conn, peer) -> None:
        started = time.monotonic()
        peer = peer[:2]
        dst = None
        try:
            dst = self.original_destination(conn)
            refusal = self.loop_reason(peer, dst)
            if refusal:
                reset(conn)
                self.warnings.warning(
                    f"loop {dst}", f"refused {format_address(peer)} -> {format_address(dst)}: {refusal}"
                )
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sniffed, first = await self.sniff(conn)
            record = ConnectionRecord(peer, dst, sniffed.hostname if self.config.sniff else None, started)
            if sniffed.protocol == HTTP and self.forward_http:
                try:
                    return await self.forward(conn, first, record)
                except NeedsTunnel as exc:  # e.g. a WebSocket upgrade: tunnel it as it came
                    first = exc.data
            try:
                upstream, early = await self.open_tunnel(dst, record)
            except UpstreamError as exc:
                reset(conn)
                record.log(self.config.upstream, f"refused:{exc.reason}", detail=str(exc))
                return
            source = upstream.getsockname()[:2]
            self.own_sources.add(source)
            try:
                result = await pump(
                    conn,
                    upstream,
                    to_upstream_first=first,
                    to_client_first=early,
                    idle_timeout=self.config.idle_timeout,
                    pipe_size=self.config.pipe_size,
                )
            finally:
                self.own_sources.discard(source)
            record.up, record.down = result.sent_up, result.sent_down
            record.log(self.config.upstream, result.ended)
        except OSError as exc:
            reset(conn)
            self.warnings.warning(f"conn-{exc.errno}", f"connection from {format_address(peer)} failed: {exc}")
        except Exception:
            # A bug must cost one connection, not the relay and every other connection.
            reset(conn)
            log.exception("internal error while relaying %s -> %s", format_address(peer), dst and format_address(dst))
        except BaseException:
            reset(conn)  # cancelled (shutdown): the client must not see a clean end of data
            raise

    async def sniff(self, conn) -> tuple[Sniffed, bytes]:
        """What the client's first bytes say (protocol, hostname), and those bytes.

        Waits at most --sniff-timeout: a client that waits for the server to
        speak first (SSH, SMTP) is then connected by address.
        """
        config = self.config
        if not self.forward_http and not (config.sniff and config.upstream.scheme in NAMED_SCHEMES):
            return NOT_RECOGNISED, b""
        sniffer = Sniffer()
        with trio.move_on_after(config.sniff_timeout):
            while sniffer.result is None:
                data = await conn.recv(MAX_SNIFF_BYTES)
                if not data:
                    break
                sniffer.receive_data(data)
        return sniffer.give_up(), sniffer.buffered

    async def forward(self, conn, first: bytes, record: "ConnectionRecord") -> None:
        """Plain HTTP to an HTTP proxy in absolute form (see relay.net.http_forward)."""
        config = self.config
        upstream = config.upstream
        forwarder = HttpForwarder(
            conn,
            first,
            record.dst,
            lambda: connect(self.proxy_addresses, mark=config.mark, timeout=config.connect_timeout),
            use_names=config.sniff,
            proxy_authorization=basic_credentials(upstream.username, upstream.password.reveal()) if upstream.password else None,
            idle_timeout=config.idle_timeout,
        )
        detail = None
        try:
            ended = await forwarder.run()
            conn.close()
        except ForwardFailed as exc:
            ended = exc.ended
            reset(conn)
        except UpstreamError as exc:
            ended, detail = f"refused:{exc.reason}", str(exc)
            reset(conn)
        record.up, record.down, record.http_requests = forwarder.sent_up, forwarder.sent_down, forwarder.requests
        record.log(upstream, ended, detail)

    async def open_tunnel(self, dst, record: "ConnectionRecord"):
        """The upstream socket and the bytes already received on it, asking for the
        sniffed name if there is one; if the proxy cannot reach that name, once more
        by address (nothing has reached the client yet, so nothing is lost)."""
        config = self.config

        async def attempt(target):
            return await open_upstream(
                config.upstream,
                self.proxy_addresses,
                target,
                mark=config.mark,
                connect_timeout=config.connect_timeout,
                handshake_timeout=config.handshake_timeout,
            )

        if record.name is None:
            return await attempt(dst)
        try:
            return await attempt((record.name, dst[1]))
        except UpstreamError as exc:
            if not exc.about_target:
                raise
            record.retried = exc.reason
            return await attempt(dst)

    async def serve(self) -> None:
        """Accept and relay until SIGINT/SIGTERM."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(accept_loop, listener, self.handle, nursery, self.warnings)
                log.info(
                    "listening on %s (%s), upstream %s, fast path: %s",
                    ", ".join(format_address(a) for a in sorted(self.listening)),
                    self.config.mode,
                    self.config.upstream,
                    fastpath.WHY,
                )
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        for listener in self.listeners:
            listener.close()


async def run(config: Config) -> None:
    server = Server(config)
    await server.open()
    await server.serve()
