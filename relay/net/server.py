"""The relay itself: listeners, per-connection handling, and shutdown on signals."""

import errno
import signal
import socket
import time

import trio

from relay import fastpath
from relay.config import Config, ConfigError
from relay.logs import RateLimited, conn_log, log
from relay.net.dial import UpstreamError, apply_mark, open_upstream, resolve
from relay.net.listener import accept_loop, open_listeners
from relay.net.pump import pump
from relay.net.sockets import format_address, is_local_address, reset

WILDCARDS = ("0.0.0.0", "::")


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.listeners: list[trio.socket.SocketType] = []
        self.listening: set[tuple[str, int]] = set()
        self.proxy_addresses: list[tuple[int, tuple]] = []  # resolved once, at start
        # Local addresses of our open upstream sockets: a client coming *from* one is our own traffic looped back.
        self.own_sources: set[tuple[str, int]] = set()
        self.warnings = RateLimited()

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
            config = self.config
            try:
                upstream, early = await open_upstream(
                    config.upstream,
                    self.proxy_addresses,
                    dst,
                    mark=config.mark,
                    connect_timeout=config.connect_timeout,
                    handshake_timeout=config.handshake_timeout,
                )
            except UpstreamError as exc:
                reset(conn)
                self._log_connection(peer, dst, started, 0, 0, f"refused:{exc.reason}", str(exc))
                return
            source = upstream.getsockname()[:2]
            self.own_sources.add(source)
            try:
                result = await pump(
                    conn,
                    upstream,
                    to_client_first=early,
                    idle_timeout=config.idle_timeout,
                    pipe_size=config.pipe_size,
                )
            finally:
                self.own_sources.discard(source)
            self._log_connection(peer, dst, started, result.sent_up, result.sent_down, result.ended)
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

    def _log_connection(self, peer, dst, started, up, down, ended, detail=None) -> None:
        line = (
            f"conn client={format_address(peer)} dst={format_address(dst)} via={self.config.upstream} "
            f"up={up} down={down} time={time.monotonic() - started:.3f}s end={ended}"
        )
        if detail:
            line += f" error={detail!r}"
        conn_log.info("%s", line)

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
