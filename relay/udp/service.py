"""UDP over TPROXY through SOCKS5 UDP ASSOCIATE: the Trio side.

- Listeners: a transparent UDP socket per listen address (the TCP listeners' port), each datagram read
  with its original destination (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR) as TPROXY left it.
- The fast path's UdpEngine reads them in a thread of C, and relays every datagram of an associated
  session both ways itself: up behind the SOCKS5 UDP header to the relay address the proxy named,
  down (from that address only) out of a transparent socket bound to the remote the reply comes from
  (shared by the sessions that talk to it), so the client sees the address it asked. What Python
  does here is what is slow or policy: a client's first datagrams (handed over by the engine), the
  association, idle time, counters and the end.
- Sessions (relay.udp.sessions): one per client address and port. Each has its own TCP control
  connection to the proxy, kept open (RFC 1928 §7: the association lives as long as it does), and its
  own UDP socket connected to the relay address (an unspecified BND.ADDR: the proxy's own address,
  the one the control connection reached).

A session ends when idle for --udp-idle-timeout (either way), when the proxy closes its control
connection or refuses the association, or at shutdown; its sockets close with it.
"""

import ipaddress
import logging
import os
import socket

import trio

from relay import fastpath
from relay.addresses import format_address
from relay.config import Config, ConfigError, Upstream
from relay.ends import errno_word, local_failure
from relay.logs import RateLimited, conn_log
from relay.net.dial import apply_mark, resolve
from relay.net.faults import UpstreamError
from relay.net.listener import DEFAULT_LISTEN, ipv6_available
from relay.net.sockets import family_of, receive_some
from relay.proto.errors import ProtocolError
from relay.udp.sessions import Refused, Session, SessionTable

IP_RECVORIGDSTADDR = 20  # Linux; also IP_ORIGDSTADDR, the ancillary message's type
IPV6_RECVORIGDSTADDR = 74
# Receive buffers of the listeners and of each association's socket: a burst the relay's one thread has not
# read yet waits there rather than being dropped (the kernel doubles it and caps it at rmem_max without root).
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def enlarge_receive_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)  # past rmem_max, with CAP_NET_ADMIN
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def association_socket(relay_address: tuple[str, int], mark: int | None) -> socket.socket:
    """A session's non-blocking UDP socket to the relay address the proxy named; raises OSError (and closes it)."""
    sock = socket.socket(family_of(relay_address[0]), socket.SOCK_DGRAM)
    try:
        if mark is not None:
            apply_mark(sock, mark)
        enlarge_receive_buffer(sock)
        # Connected: the kernel takes datagrams from the relay address only (a stranger's gets a port
        # unreachable), and looks its route up once.
        sock.connect(relay_address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


CONTROL_RECEIVE = 512  # a control connection carries nothing after the reply: anything is a fault
REPLY_SOCKETS_PER_SESSION = 4  # reply sockets in all, per --udp-max-sessions: most sessions talk to one remote
# After a failed association, a client's datagrams are dropped this long (or until idle) before another try:
# a busy client must not open a connection to a refusing proxy per datagram.
FAILED_HOLD = 2.0


def open_udp_listener(host: str, port: int) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        try:
            fastpath.set_transparent(sock)
        except PermissionError:
            raise ConfigError("--udp needs CAP_NET_ADMIN (run as root, or grant the capability)") from None
        enlarge_receive_buffer(sock)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot receive UDP on {format_address((host, port))}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class Association:
    """The Trio side of one session: its control connection, its UDP socket to the proxy, and its
    handle in the engine once associated."""

    __slots__ = ("control", "udp", "scope", "failed", "handle")

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        self.failed = False  # the proxy could not be reached or refused: datagrams are dropped until it ends
        self.control = None
        self.udp: socket.socket | None = None
        self.handle: int | None = None


class UdpService:
    def __init__(self, config: Config, metrics, dialer, clock=trio.current_time):
        self.config = config
        self.metrics = metrics
        self.dialer = dialer  # relay.net.dial.Dialer: the TCP side's, with its pool of pre-opened connections
        self.table = SessionTable(
            config.udp_max_sessions, config.udp_max_per_source, config.udp_idle_timeout, clock=clock
        )
        self.listeners: list[socket.socket] = []
        self.engine = None
        self.sessions: dict[int, Session] = {}  # by their handle in the engine
        self.warnings = RateLimited()
        # How often the engine's counters are read and idle sessions ended: a session ends at most this late.
        self.sweep_interval = min(1.0, config.udp_idle_timeout / 10)
        self._nursery: trio.Nursery | None = None

    @property
    def upstream(self) -> Upstream:
        return self.config.udp_upstreams[0]

    def open(self) -> None:
        """Bind the transparent UDP listeners on the TCP listeners' addresses; raises ConfigError."""
        addresses = self.config.listen or [a for a in DEFAULT_LISTEN if ":" not in a[0] or ipv6_available()]
        config = self.config
        try:
            for host, port in addresses:
                self.listeners.append(open_udp_listener(host, port))
            self.engine = fastpath.UdpEngine(
                config.udp_max_sessions,
                REPLY_SOCKETS_PER_SESSION * config.udp_max_sessions,
                -1 if config.mark is None else config.mark,
            )
            for sock in self.listeners:
                self.engine.add_listener(sock.fileno())
        except BaseException:
            self.close()
            raise
        self.metrics.collectors.append(self.collect)

    def close(self) -> None:
        if self.engine is not None:
            self.collect()
            self.engine.close()
            self.engine = None
            if self.collect in self.metrics.collectors:
                self.metrics.collectors.remove(self.collect)
        for sock in self.listeners:
            sock.close()
        self.listeners = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.engine.start()
                nursery.start_soon(self.receive_handed_over)
                nursery.start_soon(self.sweep)
                task_status.started()
        finally:
            self.close()

    # -- what the engine does not relay itself -------------------------------------

    async def receive_handed_over(self) -> None:
        """Clients' datagrams the engine has no session for: new clients, and those not associated yet."""
        while True:
            await trio.lowlevel.wait_readable(self.engine.fileno())
            for client, destination, payload in self.engine.take():
                self.from_client(client, destination, payload)

    def from_client(self, client: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
        session = self.table.get(client)
        if session is None:
            try:
                session = self.table.open(client)
            except Refused as exc:
                self.metrics.udp_dropped(exc.reason)
                self.warnings.warning(
                    f"udp-{exc.reason}", f"UDP: no session for a new client ({exc.reason}): datagrams dropped"
                )
                return
            self.metrics.udp_session_opened()
            session.handle = Association(trio.CancelScope())
            self._nursery.start_soon(self.run_session, session)
        session.active(self.table.clock())
        if session.handle.failed:
            self.metrics.udp_dropped("no-association")
        elif not session.queue(destination, payload):  # relayed once the association is made
            self.metrics.udp_dropped("queue-full")

    async def sweep(self) -> None:
        """End the sessions idle for --udp-idle-timeout, knowing what the engine relayed until now."""
        while True:
            await trio.sleep(self.sweep_interval)
            self.collect()
            now = self.table.clock()
            for session in self.table:
                if now >= session.idle_deadline():
                    session.handle.scope.cancel()

    def collect(self) -> None:
        """Bring in what the engine relayed and dropped since the last call; sessions that relayed
        anything are active now (a sweep late at most: they end later, never earlier)."""
        if self.engine is None:
            return
        drops, active, reply_errno = self.engine.collect()
        for reason, count in drops.items():
            self.metrics.udp_dropped(reason, count)
        if reply_errno:
            self.warnings.warning(
                f"udp-reply:{reply_errno}", f"UDP: cannot open a reply socket: {os.strerror(reply_errno)}"
            )
        now = self.table.clock()
        for handle, *counts in active:
            session = self.sessions[handle]
            self.count(session, *counts)
            session.active(now)

    def count(self, session: Session, datagrams_up: int, bytes_up: int, datagrams_down: int, bytes_down: int):
        session.relayed(datagrams_up, bytes_up, datagrams_down, bytes_down)
        self.metrics.udp_relayed("up", datagrams_up, bytes_up)
        self.metrics.udp_relayed("down", datagrams_down, bytes_down)

    # -- a session ---------------------------------------------------------------

    async def run_session(self, session: Session) -> None:
        association: Association = session.handle
        ended = "shutdown"  # cancelled from outside: the relay is stopping
        try:
            with association.scope:
                ended = await self.associate_and_relay(session, association)
                if association.handle is None:  # no association: the client's datagrams are dropped a
                    association.failed = True  # while, rather than each opening a connection to the proxy
                    if association.control is not None:
                        association.control.close()
                        association.control = None
                    await trio.sleep(FAILED_HOLD)
            if association.scope.cancelled_caught and not association.failed:
                ended = "idle"  # only the sweep cancels the session's own scope, when it is idle
        finally:
            if association.handle is not None:  # out of the engine before its socket closes
                *counts, session.remote_count = self.engine.remove_session(association.handle)
                del self.sessions[association.handle]
                self.count(session, *counts)
            for sock in (association.udp, association.control):
                if sock is not None:
                    sock.close()
            self.table.close(session)
            self.metrics.udp_session_ended(ended)
            self.log(session, ended)

    def log(self, session: Session, ended: str) -> None:
        """The per-session log line (-v), in the per-connection line's form."""
        if not conn_log.isEnabledFor(logging.INFO):
            return
        fields = {
            "event": "udp",
            "client": format_address(session.client),
            "via": str(self.upstream),
            "remotes": session.remote_count,
            "up": session.bytes_up,
            "down": session.bytes_down,
            "datagrams-up": session.datagrams_up,
            "datagrams-down": session.datagrams_down,
            "time": f"{self.table.clock() - session.opened:.3f}s",
            "end": ended,
        }
        text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "event")
        conn_log.info("udp %s", text, extra={"fields": fields})

    async def associate_and_relay(self, session: Session, association: Association) -> str:
        """Open the association, hand the session to the engine, and wait until the proxy ends it;
        returns how it ended (the idle deadline and shutdown end it by cancellation instead)."""
        upstream = self.upstream
        config = self.config
        try:
            with trio.fail_after(config.connect_timeout + config.handshake_timeout):
                addresses = await resolve(upstream.host, upstream.port)
                # Through the Dialer: a pre-opened connection if one waits, the handshake pipelined if
                # the proxy takes that, as for relayed connections.
                association.control, bound = await self.dialer.associate_udp(
                    upstream,
                    addresses,
                    mark=config.mark,
                    connect_timeout=config.connect_timeout,
                    handshake_timeout=config.handshake_timeout,
                )
            relay_address = relay_address_of(bound, association.control)
        except trio.TooSlowError:
            self.proxy_failed("timed out opening the association")
            return "timeout"
        except UpstreamError as exc:
            self.proxy_failed(str(exc))
            # connect-econnrefused, proxy-closed, ... or relay-emfile when out of fds
            return "refused" if exc.refused else exc.reason
        except OSError as exc:
            self.proxy_failed(exc.strerror or str(exc))
            return "connect-" + errno_word(exc.errno)
        except ProtocolError as exc:
            self.proxy_failed(str(exc))
            return "proxy-protocol-error"
        try:
            association.udp = udp = association_socket(relay_address, config.mark)
            # The datagrams kept until now go first, then any the engine still holds for this client.
            association.handle = self.engine.add_session(session.client, udp.fileno(), session.queued)
        except OSError as exc:  # out of fds: this session fails, the others go on
            self.warnings.warning(f"udp-socket:{exc.errno}", f"UDP: cannot open a socket: {exc.strerror}")
            return local_failure(exc.errno)
        session.queued.clear()
        self.sessions[association.handle] = session
        return await self.watch_control(association)

    def proxy_failed(self, reason: str) -> None:
        self.warnings.warning(f"udp-associate:{reason}", f"UDP: no association through {self.upstream}: {reason}")

    async def watch_control(self, association: Association) -> str:
        """Until the proxy closes the control connection (or sends on it, which RFC 1928 has no use for)."""
        try:
            data = await receive_some(association.control, CONTROL_RECEIVE)
        except OSError as exc:  # a reset
            return "proxy-" + errno_word(exc.errno)
        return "proxy-closed" if not data else "proxy-protocol-error"


def relay_address_of(bound: tuple[str, int], control: socket.socket) -> tuple[str, int]:
    """Where the association's datagrams go: the reply's BND.ADDR and BND.PORT, an unspecified address
    meaning the proxy's own (RFC 1928), the one the control connection reached."""
    host, port = bound
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(f"the proxy named {host!r}, not an address, as its UDP relay") from None
    if address.is_unspecified:
        host = control.getpeername()[0]
    if port == 0:
        raise ProtocolError("the proxy named port 0 as its UDP relay")
    return host, port
