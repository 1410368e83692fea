"""The relay itself: listeners, per-connection handling, upstream choice, reloads and draining."""

import errno
import functools
import ipaddress
import logging
import resource
import signal
import socket
import time

import trio

from relay import fastpath, systemd
from relay._fastpath_common import local_failure
from relay.config import Config, ConfigError
from relay.logs import RateLimited, conn_log, log
from relay.net.dial import Dialer, UpstreamError, apply_mark, connect
from relay.net.http_forward import ForwardFailed, HttpForwarder, NeedsTunnel
from relay.net.listener import accept_loop, open_listeners
from relay.net.pump import Pump
from relay.net.sockets import format_address, is_local_address, receive_some, reset
from relay.net.upstreams import NAMED_SCHEMES, Attempts, UpstreamPool, UpstreamState
from relay.net.waiting import WaitingRoom
from relay.proto.http_connect import basic_credentials
from relay.proto.sniff import HTTP, MAX_SNIFF_BYTES, NOT_RECOGNISED, Sniffed, Sniffer

WILDCARDS = ("0.0.0.0", "::")
# Destinations that are never relayed unless --allow-dest says so: they mean this
# router (or the proxy's machine), not something beyond it.
REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(text)
    for text in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128")
)
# One relayed connection holds two sockets and, while data flows, two pipes.
FDS_PER_CONNECTION = 6
# Listeners, epoll, logs, the metrics server, health checks, ssh: never handed to connections.
# (Pooled pipes come from connections that ended, so they fit in the freed slots' share.)
# A quarter of a small limit is plenty; 256 fds then still relay 32 connections, not 9.
RESERVED_FDS = 200
LOCAL_ADDRESS_TTL = 10.0  # seconds a "is this one of our addresses" answer is kept

# Settings a reload cannot change on a running process (they shape sockets, processes or privileges).
RESTART_ONLY = ("mode", "listen", "workers", "user", "metrics", "ssh", "ssh_identity", "ssh_option", "log_format")


class ConnectionRecord:
    """What the per-connection log line (-v) says about one connection."""

    __slots__ = ("peer", "dst", "name", "started", "retried", "up", "down", "http_requests", "via", "source")

    def __init__(self, peer, dst, name, started):
        self.peer, self.dst, self.name, self.started = peer, dst, name, started
        self.retried = None  # the proxy's reason for refusing the name, when we then asked by address
        self.up = self.down = 0
        self.http_requests = None  # forwarded in absolute form, when not tunnelled
        self.via = None
        self.source = None  # the upstream socket's local address, while it is in own_sources

    def log(self, ended: str, detail: str | None = None) -> None:
        if not conn_log.isEnabledFor(logging.INFO):
            return  # most routers run without -v: build nothing
        fields = {"event": "conn", "client": format_address(self.peer), "dst": format_address(self.dst)}
        if self.name:
            fields["name"] = self.name
        if self.retried:
            fields["retried-by-ip"] = self.retried
        if self.http_requests is not None:
            fields["http-requests"] = self.http_requests
        fields.update(
            via=str(self.via or "-"),
            up=self.up,
            down=self.down,
            time=f"{time.monotonic() - self.started:.3f}s",
            end=ended,
        )
        if detail:
            fields["error"] = detail
        text = " ".join(
            f"{key}={value!r}" if key == "error" else f"{key}={value}"
            for key, value in fields.items()
            if key != "event"
        )
        conn_log.info("conn %s", text, extra={"fields": fields})


class Admitted:
    """A connection past the admission checks, before its first bytes: what the rest needs."""

    __slots__ = ("peer", "dst", "started", "config", "pool", "sniff_deadline")

    def __init__(self, peer, dst, started, config, pool, sniff_deadline):
        self.peer, self.dst, self.started = peer, dst, started
        self.config, self.pool = config, pool  # as they were at accept time: a reload affects new connections only
        self.sniff_deadline = sniff_deadline  # Trio's clock


class Opening:
    """A connection whose tunnel is being opened: what the Dialer's callbacks need."""

    __slots__ = ("server", "conn", "admitted", "record", "first", "silent", "candidates", "attempts", "attempt_started")

    def __init__(
        self, server, conn, admitted: Admitted, record: ConnectionRecord, first: bytes, silent: bool, candidates
    ):
        self.server, self.conn, self.admitted, self.record = server, conn, admitted, record
        self.first = first  # the client's bytes read so far: they go upstream first
        self.silent = silent  # started by the waiting room's turns (see WaitingRoom.done_silent)
        self.candidates = candidates
        self.attempts: Attempts | None = None
        self.attempt_started = 0.0

    def opened(self, upstream: socket.socket, early: bytes) -> None:
        self.server.tunnel_opened(self, upstream, early)

    def failed(self, error: UpstreamError) -> None:
        self.server.attempt_failed(self, error)


class Server:
    def __init__(self, config: Config, metrics, reload=None):
        self.config = config
        self.metrics = metrics
        self.reload = reload  # returns a fresh Config (file re-read, command line re-applied), or raises ConfigError
        self.listeners: list[socket.socket] = []
        self.listening: set[tuple[str, int]] = set()
        self.dialer = Dialer()
        self.pool = UpstreamPool(config, metrics, self.dialer)
        self.tunnels = []
        # Local addresses of our open upstream sockets: a client coming *from* one is our own traffic looped back.
        self.own_sources: set[tuple[str, int]] = set()
        self.warnings = RateLimited()
        self.refusals = RateLimited(interval=60.0)  # refused destinations: once per destination per minute
        self.refused_endpoints: set[tuple[str, int]] = set()  # the SSH server
        self.local_addresses: dict[str, tuple[bool, float]] = {}
        self.slots = trio.Semaphore(connection_budget(config))
        self.per_source: dict[str, int] = {}
        self.pump = Pump(self.relayed_ended)
        self.waiting = WaitingRoom(self.start, self.abandon)
        self.connections: trio.Nursery | None = None  # the tasks of connections not yet relayed, while serving

    async def open(self) -> None:
        """Bind the listeners and check capabilities; raises ConfigError with a user-facing message."""
        config = self.config
        if config.mark is not None:
            with socket.socket() as probe:
                try:
                    apply_mark(probe, config.mark)
                except PermissionError:
                    raise ConfigError("--mark needs CAP_NET_ADMIN (run as root, or grant the capability)") from None
        if config.ssh:
            self.tunnels = make_tunnels(config, self.metrics)
            target = self.tunnels[0].target if self.tunnels else None
            if target is not None:
                infos = await trio.socket.getaddrinfo(target.host, target.port or 22, type=socket.SOCK_STREAM)
                self.refused_endpoints = {info[4][:2] for info in infos}
        else:
            await self.pool.resolve()
        self.listeners = await open_listeners(
            config.listen, transparent=config.mode == "tproxy", reuse_port=config.workers > 1
        )
        self.listening = {sock.getsockname()[:2] for sock in self.listeners}

    # -- one connection ----------------------------------------------------------

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
        if dst in self.pool.proxy_addresses():
            return "its destination is the upstream proxy itself (a routing loop: exempt --mark traffic)"
        for host, port in self.listening:
            if dst[1] == port and (dst[0] == host or (host in WILDCARDS and is_local_address(dst[0]))):
                return "its destination is the relay's own listening port"
        return None

    def is_local(self, host: str) -> bool:
        now = time.monotonic()
        known = self.local_addresses.get(host)
        if known is None or known[1] < now:
            if len(self.local_addresses) > 1024:
                self.local_addresses.clear()  # bounded: a scan of many addresses cannot grow it
            known = self.local_addresses[host] = (is_local_address(host), now + LOCAL_ADDRESS_TTL)
        return known[0]

    def destination_refusal(self, config: Config, dst) -> str | None:
        """Why the destination policy refuses ``dst`` (the router, loopback, link-local, the SSH server)."""
        if config.allow_dest:
            address = parse_address(dst[0])
            if any(address in network for network in config.allow_dest):
                return None
        if dst in self.refused_endpoints:
            return "it is the SSH server of the tunnel"
        if in_refused_network(dst[0]):
            return "loopback, link-local or unspecified addresses mean this machine, not a server"
        if self.is_local(dst[0]):
            return "it is one of the router's own addresses"
        return None

    def admission_refusal(self, config: Config, peer, dst):
        """(how it ended, why, which log limiter, its key) if this connection must be reset at once."""
        why = self.loop_reason(peer, dst)
        if why:
            return "refused:loop", why, self.warnings, f"loop {dst}"
        why = self.destination_refusal(config, dst)
        if why:
            return "refused:destination", why, self.refusals, f"dst {dst}"
        if config.max_per_source and self.per_source.get(peer[0], 0) >= config.max_per_source:
            why = f"{config.max_per_source} connections from {peer[0]} already (--max-per-source)"
            return "refused:per-source-limit", why, self.warnings, f"source {peer[0]}"
        return None

    # -- admission: at accept time, without a task ----------------------------------

    def accepted(self, conn: socket.socket, peer) -> None:
        """From accept_loop, which took a slot for it: admit the connection, then go on with it now
        (its client spoke already, or nothing needs its first bytes) or once it speaks or is silent
        for --sniff-timeout (see relay.net.waiting)."""
        try:
            admitted = self.admit(conn, peer[:2], self.config)
        except Exception:
            # A bug must cost one connection, not the accept loop and every connection after it.
            reset(conn)
            log.exception("internal error while admitting %s", format_address(peer))
            self.connection_ended(None, None, "error")
            admitted = None
        if admitted is None:
            self.slots.release()
            return
        if self.waiting.closed:  # shutting down: an accept loop woken just before it was cancelled
            self.abandon(conn, admitted)
            return
        try:
            conn.setblocking(False)
        except OSError as exc:
            self.connection_ended(admitted.peer[0], None, self.client_failed(conn, admitted.peer, exc))
            self.slots.release()
            return
        self.start(conn, admitted, True)

    def wait_for_first_bytes(self, conn: socket.socket, admitted: Admitted) -> None:
        try:
            self.waiting.add(conn, admitted, admitted.sniff_deadline)
        except OSError as exc:  # e.g. epoll's watch limit: the relay's shortage, not the client's
            peer = format_address(admitted.peer)
            self.warnings.warning(f"wait-{exc.errno}", f"cannot take a connection from {peer}: {exc}")
            self.abandon(conn, admitted, local_failure(exc.errno))

    def admit(self, conn: socket.socket, peer, config: Config) -> Admitted | None:
        """The admission checks (loops, destination policy, per-source cap); None if refused (reset)."""
        self.metrics.connection_accepted()
        started = time.monotonic()
        try:
            dst = self.original_destination(conn)
        except OSError as exc:
            self.connection_ended(None, None, self.client_failed(conn, peer, exc))
            return None
        refusal = self.admission_refusal(config, peer, dst)
        if refusal:
            ended, why, limiter, key = refusal
            reset(conn)
            limiter.warning(key, f"refused {format_address(peer)} -> {format_address(dst)}: {why}")
            self.connection_ended(None, None, ended)
            return None
        self.per_source[peer[0]] = self.per_source.get(peer[0], 0) + 1
        return Admitted(peer, dst, started, config, self.pool, trio.current_time() + config.sniff_timeout)

    def client_failed(self, conn, peer, exc: OSError) -> str:
        """Reset a connection whose client socket failed; how it ended."""
        reset(conn)
        self.warnings.warning(f"conn-{exc.errno}", f"connection from {format_address(peer)} failed: {exc}")
        return "client-" + errno.errorcode.get(exc.errno, "error").lower()

    def start(self, conn: socket.socket, admitted: Admitted, spoke: bool) -> None:
        """Sniff and open the tunnel. Without a task when the client's first bytes are all here (the
        common case): the Dialer's callbacks take it from there. A client that has not spoken yet
        waits in the waiting room; a task only for what must wait for the client after its first
        bytes (more of them, plain HTTP forwarding) and for a silent client.

        ``spoke``: False once a silent client's wait is over; True otherwise (the client may
        speak, and only then is it read)."""
        sniffer = None
        try:
            if spoke and self.wants_sniffing(admitted.config, admitted.pool):
                data = conn.recv(MAX_SNIFF_BYTES)
                sniffer = Sniffer()
                if data:
                    sniffer.receive_data(data)
                else:  # closed before a word: connected by address, it may still want to hear
                    sniffer.give_up()
        except BlockingIOError:
            self.wait_for_first_bytes(conn, admitted)
            return
        except OSError as exc:
            self.connection_ended(admitted.peer[0], None, self.client_failed(conn, admitted.peer, exc))
            self.slots.release()
            return
        except Exception:  # the client's bytes must not take the accept loop down with them
            log.exception(
                "internal error while relaying %s -> %s", format_address(admitted.peer), format_address(admitted.dst)
            )
            self.abandon(conn, admitted, "error")
            return
        opening = None
        if spoke and (sniffer is None or sniffer.result is not None):
            sniffed, first = (sniffer.result, sniffer.buffered) if sniffer else (NOT_RECOGNISED, b"")
            try:
                opening = self.prepare(conn, admitted, sniffed, first, silent=False)
                if opening.attempts is not None:
                    self.dial(opening)
                    return
            except Exception:
                log.exception(
                    "internal error while relaying %s -> %s",
                    format_address(admitted.peer),
                    format_address(admitted.dst),
                )
                self.abandon(conn, admitted, "error")
                return
        self.connections.start_soon(self.handle, conn, admitted, spoke, sniffer, opening)

    def abandon(self, conn: socket.socket, admitted: Admitted, ended: str = "cancelled") -> None:
        """An admitted connection that gets no task: still waiting for its first bytes at shutdown."""
        reset(conn)
        self.connection_ended(admitted.peer[0], None, ended)
        self.slots.release()

    # -- one connection: what needs a task ---------------------------------------------

    async def handle(
        self, conn: socket.socket, admitted: Admitted, spoke: bool, sniffer: Sniffer | None, opening: "Opening | None"
    ) -> None:
        """A connection whose client must be waited for, or that is forwarded as plain HTTP."""
        handed_over = False
        try:
            handed_over = await self.relay(trio.socket.from_stdlib_socket(conn), admitted, spoke, sniffer, opening)
        finally:
            if not handed_over:  # else the dial's end, or the pump's, gives them back
                if not spoke:
                    self.waiting.done_silent()
                self.slots.release()  # taken by accept_loop before accepting this connection

    async def relay(
        self, conn, admitted: Admitted, spoke: bool, sniffer: Sniffer | None, opening: "Opening | None"
    ) -> bool:
        """Sniff (unless start() did: ``opening``), then forward, or start opening the tunnel; True
        once the dialer has the connection.

        ``spoke``: the client sent something (or closed); if not, it stayed silent for
        --sniff-timeout and is connected by address.
        """
        peer, dst = admitted.peer, admitted.dst
        record = None
        ended, detail = "error", None
        handed_over = False
        try:
            if opening is None:
                sniffed, first = await self.sniff(conn, admitted, sniffer) if spoke else (NOT_RECOGNISED, b"")
                opening = self.prepare(conn, admitted, sniffed, first, silent=not spoke)
            opening.conn = conn
            record = opening.record
            if opening.attempts is None:
                try:
                    ended, detail = await self.forward(
                        conn, opening.first, record, admitted.config, admitted.pool, opening.candidates
                    )
                    return False
                except NeedsTunnel as exc:  # e.g. a WebSocket upgrade: tunnel it as it came
                    opening.first = exc.data
                    opening.attempts = Attempts(admitted.pool, opening.candidates, False, dst, record)
            self.dial(opening)
            handed_over = True
            return True
        except OSError as exc:
            ended = self.client_failed(conn, peer, exc)
        except Exception:
            reset(conn)
            log.exception("internal error while relaying %s -> %s", format_address(peer), format_address(dst))
        except BaseException:
            reset(conn)  # cancelled (shutdown): the client must not see a clean end of data
            ended = "cancelled"
            raise
        finally:
            if not handed_over:
                self.connection_ended(peer[0], record, ended, detail)
        return False

    # -- one connection: opening the tunnel, without a task -------------------------------

    def prepare(self, conn, admitted: Admitted, sniffed: Sniffed, first: bytes, silent: bool) -> "Opening":
        """What the connection will try, once its first bytes are known. ``attempts`` is None when it
        is forwarded as plain HTTP (that needs a task) instead of tunnelled."""
        config, dst = admitted.config, admitted.dst
        record = ConnectionRecord(admitted.peer, dst, sniffed.hostname if config.sniff else None, admitted.started)
        direct = bypassed(config, dst, sniffed.hostname)
        candidates = [] if direct else admitted.pool.candidates()
        opening = Opening(self, conn, admitted, record, first, silent, candidates)
        if not (sniffed.protocol == HTTP and self.forwards_http(config, candidates)):
            opening.attempts = Attempts(admitted.pool, candidates, direct, dst, record)
        return opening

    def dial(self, opening: "Opening") -> None:
        """The next attempt at opening the tunnel (see Attempts), or the end if none is left."""
        try:
            upstream, addresses, target = opening.attempts.next()
        except UpstreamError as exc:
            reset(opening.conn)
            if exc.reason in ("cancelled", "internal-error"):  # shutting down; a bug, logged already
                self.opening_ended(opening, "cancelled" if exc.reason == "cancelled" else "error")
            else:
                self.opening_ended(opening, f"refused:{exc.reason}", str(exc))
            return
        config = opening.admitted.config
        opening.attempt_started = time.monotonic()
        self.dialer.open(
            upstream,
            addresses,
            target,
            mark=config.mark,
            connect_timeout=config.connect_timeout,
            handshake_timeout=config.handshake_timeout,
            on_open=opening.opened,
            on_fail=opening.failed,
        )

    def attempt_failed(self, opening: "Opening", error: UpstreamError) -> None:
        try:
            opening.attempts.failed(error)
            self.dial(opening)
        except Exception:
            self.internal_error(opening)

    def tunnel_opened(self, opening: "Opening", upstream: socket.socket, early: bytes) -> None:
        """Hand both sides to the pump."""
        conn, record, config = opening.conn, opening.record, opening.admitted.config
        try:
            state = opening.attempts.succeeded()
            self.metrics.handshake_done(str(record.via), time.monotonic() - opening.attempt_started)
            record.source = upstream.getsockname()[:2]
            self.pump.add(
                conn,
                upstream,
                record,
                to_upstream_first=opening.first,
                to_client_first=early,
                idle_timeout=config.idle_timeout,
                half_closed_timeout=config.half_closed_timeout,
                pipe_size=config.pipe_size,
                confirm_eof=state.still_there if config.confirm_eof and state else None,
            )
        except OSError as exc:  # e.g. epoll's watch limit: the relay's shortage, not the client's
            reset(upstream)
            reset(conn)
            self.opening_ended(opening, local_failure(exc.errno))
            return
        except Exception:
            reset(upstream)
            self.internal_error(opening)
            return
        # The pump has both sockets now, and relayed_ended() will end the connection.
        self.own_sources.add(record.source)
        if opening.silent:
            self.waiting.done_silent()

    def internal_error(self, opening: "Opening") -> None:
        """A bug must cost one connection, not the relay and every other connection."""
        admitted = opening.admitted
        log.exception(
            "internal error while relaying %s -> %s", format_address(admitted.peer), format_address(admitted.dst)
        )
        reset(opening.conn)
        self.opening_ended(opening, "error")

    def opening_ended(self, opening: "Opening", ended: str, detail: str | None = None) -> None:
        """The connection ends before the pump had it."""
        if opening.silent:
            self.waiting.done_silent()
        self.connection_ended(opening.admitted.peer[0], opening.record, ended, detail)
        self.slots.release()

    def relayed_ended(self, record: ConnectionRecord, ended: str, sent_up: int, sent_down: int) -> None:
        """The pump is done with a connection relay() gave it."""
        self.own_sources.discard(record.source)
        record.up, record.down = sent_up, sent_down
        self.connection_ended(record.peer[0], record, ended)
        self.slots.release()

    def connection_ended(self, counted_source: str | None, record, ended: str, detail: str | None = None) -> None:
        """Per-source count, log line and metrics: the same whether the handler or the pump saw the end."""
        if counted_source is not None:
            left = self.per_source.pop(counted_source) - 1
            if left:
                self.per_source[counted_source] = left
        if record is not None:
            record.log(ended, detail)
        self.metrics.connection_closed(ended, record.up if record else 0, record.down if record else 0)

    def wants_sniffing(self, config: Config, pool: UpstreamPool) -> bool:
        return (
            (config.sniff and any(state.upstream.scheme in NAMED_SCHEMES for state in pool.states))
            or bool(config.bypass_domain)
            or self.forwards_http(config, pool.states)
        )

    @staticmethod
    def forwards_http(config: Config, candidates) -> bool:
        return config.http_mode == "forward" and bool(candidates) and candidates[0].upstream.scheme == "http"

    async def sniff(self, conn, admitted: Admitted, sniffer: Sniffer | None) -> tuple[Sniffed, bytes]:
        """What the client's first bytes say (protocol, hostname), and those bytes.

        Reads (on from what ``sniffer`` has, if start() began) until they are
        recognised or --sniff-timeout after the accept: a client that stops in
        the middle is then connected by address, as a silent one is.
        """
        if not self.wants_sniffing(admitted.config, admitted.pool):
            return NOT_RECOGNISED, b""
        sniffer = sniffer or Sniffer()
        while sniffer.result is None:
            data = await receive_some(conn, MAX_SNIFF_BYTES, admitted.sniff_deadline)
            if not data:  # None: the client is still silent at the deadline
                break
            sniffer.receive_data(data)
        return sniffer.give_up(), sniffer.buffered

    async def forward(self, conn, first, record, config, pool, candidates) -> tuple[str, str | None]:
        """Plain HTTP to an HTTP proxy in absolute form (see relay.net.http_forward)."""
        http_candidates = [state for state in candidates if state.upstream.scheme == "http"]
        used: list[UpstreamState] = []

        async def open_proxy():
            last = None
            for state in http_candidates:
                try:
                    sock = await connect(state.addresses, mark=config.mark, timeout=config.connect_timeout)
                except UpstreamError as exc:
                    pool.failed(state, exc)
                    last = exc
                    continue
                pool.succeeded(state)
                used.append(state)
                record.via = state.upstream
                return sock
            raise last

        upstream = http_candidates[0].upstream
        forwarder = HttpForwarder(
            conn,
            first,
            record.dst,
            open_proxy,
            use_names=config.sniff,
            proxy_authorization=basic_credentials(upstream.username, upstream.password.reveal())
            if upstream.password
            else None,
            idle_timeout=config.idle_timeout,
        )
        record.via = upstream
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
        return ended, detail

    # -- the whole process ---------------------------------------------------------

    async def serve(self, signals) -> None:
        """Accept and relay until SIGINT/SIGTERM arrives on ``signals``, then drain; SIGHUP reloads."""
        async with trio.open_nursery() as services:
            for tunnel in self.tunnels:
                await services.start(tunnel.run)
            if self.tunnels:
                await self.pool.resolve(self.tunnels)
            health = await services.start(self.run_health_checks, self.pool)
            services.start_soon(self.pump.run)
            services.start_soon(self.dialer.run)
            services.start_soon(self.waiting.run)
            async with trio.open_nursery() as self.connections:
                accepting = trio.CancelScope()
                try:
                    await self.serve_until_stopped(services, signals, health, accepting)
                finally:
                    accepting.cancel()  # accept loops call self.accepted() no more
                    self.waiting.close()  # nothing starts in self.connections after this
                    self.connections.cancel_scope.cancel()  # what is left is reset
            self.dialer.close()  # reset the connections still being opened
            self.pump.close()  # handshakes are over: reset the relayed connections left
            services.cancel_scope.cancel()

    async def serve_until_stopped(self, services, signals, health, accepting: trio.CancelScope) -> None:
        services.start_soon(self.accept_all, accepting)
        log.info(
            "listening on %s (%s), upstream %s, fast path: %s",
            ", ".join(format_address(a) for a in sorted(self.listening)),
            self.config.mode,
            ", ".join(str(u) for u in self.config.upstreams),
            fastpath.WHY,
        )
        systemd.notify("READY=1")
        async for signum in signals:
            if signum == signal.SIGHUP:
                health = await self.apply_reload(services, health)
                continue
            log.info(
                "%s: not accepting; draining %d connections for up to %g s",
                signal.Signals(signum).name,
                self.in_progress(),
                self.config.drain_time,
            )
            systemd.notify("STOPPING=1")
            accepting.cancel()
            with trio.move_on_after(self.config.drain_time):
                while self.in_progress():
                    await trio.sleep(0.05)
            return

    def in_progress(self) -> int:
        """Connections not yet ended: waiting for first bytes, in a handshake, or relayed."""
        return len(self.waiting) + len(self.connections.child_tasks) + len(self.dialer) + len(self.pump)

    async def accept_all(self, accepting: trio.CancelScope) -> None:
        try:
            with accepting:
                async with trio.open_nursery() as nursery:
                    for listener in self.listeners:
                        nursery.start_soon(accept_loop, listener, self.accepted, self.warnings, self.slots)
        finally:
            for listener in self.listeners:  # closed only once no task waits on them
                listener.close()

    async def run_health_checks(self, pool: UpstreamPool, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await pool.run_health_checks()

    async def apply_reload(self, services, health: trio.CancelScope) -> trio.CancelScope:
        """SIGHUP: a new configuration for new connections; open ones keep theirs."""
        systemd.notify("RELOADING=1")
        try:
            new = self.reload()
            pool = UpstreamPool(new, self.metrics, self.dialer)
            if not new.ssh:
                await pool.resolve()
            else:
                await pool.resolve(self.tunnels)
        except ConfigError as exc:
            log.warning("SIGHUP: keeping the old configuration: %s", exc)
            systemd.notify("READY=1")
            return health
        ignored = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        for key in ignored:
            setattr(new, key, getattr(self.config, key))
        if ignored:
            log.warning("SIGHUP: %s only change on restart", ", ".join(k.replace("_", "-") for k in ignored))
        health.cancel()
        self.config, self.pool = new, pool
        log.info("SIGHUP: configuration reloaded; upstream %s", ", ".join(str(u) for u in new.upstreams))
        systemd.notify("READY=1")
        return await services.start(self.run_health_checks, pool)


def connection_budget(config: Config) -> int:
    """--max-connections, or as many as the fd limit allows (each costs FDS_PER_CONNECTION)."""
    if config.max_connections:
        return config.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, (soft - min(RESERVED_FDS, soft // 4)) // FDS_PER_CONNECTION)


# Per connection, parsing the destination and testing it against REFUSED_NETWORKS were a
# noticeable part of the handler's CPU; most connections go to addresses seen before.
# Bounded: a scan of many addresses only evicts the oldest.
parse_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


@functools.lru_cache(maxsize=4096)
def in_refused_network(host: str) -> bool:
    """Whether ``host`` (an address) is in REFUSED_NETWORKS: it means this machine, not a server."""
    address = parse_address(host)
    return any(address in network for network in REFUSED_NETWORKS)


def bypassed(config: Config, dst, hostname: str | None) -> bool:
    """Whether this destination goes direct (--bypass, --bypass-domain) instead of through a proxy."""
    if config.bypass:
        address = parse_address(dst[0])
        if any(address in network for network in config.bypass):
            return True
    if hostname and config.bypass_domain:
        return any(hostname == suffix or hostname.endswith("." + suffix) for suffix in config.bypass_domain)
    return False


def make_tunnels(config: Config, metrics) -> list:
    """One supervised ssh per upstream: -L to an HTTP/SOCKS4 proxy as the far host sees it, -D for SOCKS5."""
    from relay.net.tunnel import SshTunnel, parse_ssh_target

    target = parse_ssh_target(config.ssh)
    tunnels = []
    for upstream in config.upstreams:
        if upstream.scheme == "socks5":
            tunnel = SshTunnel(
                target,
                forward="socks",
                remote=None,
                local=(upstream.host, upstream.port),
                identity=config.ssh_identity,
                options=tuple(config.ssh_option),
            )
        else:
            tunnel = SshTunnel(
                target,
                forward="local",
                remote=(upstream.host, upstream.port),
                local=("127.0.0.1", 0),
                identity=config.ssh_identity,
                options=tuple(config.ssh_option),
            )
        tunnel.on_restart = lambda reason, name=str(upstream): metrics.tunnel_restarted(name, reason)
        tunnels.append(tunnel)
    return tunnels
