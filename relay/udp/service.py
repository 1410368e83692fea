"""UDP over TPROXY through SOCKS5 UDP ASSOCIATE: the Trio side.

- Listeners: a transparent UDP socket per listen address (the TCP listeners' port), each datagram read
  with its original destination (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR) as TPROXY left it.
- Sessions (relay.udp.sessions): one per client address and port. Each has its own TCP control
  connection to the proxy, kept open (RFC 1928 §7: the association lives as long as it does), and its
  own UDP socket sending to the relay address the proxy named (an unspecified BND.ADDR: the proxy's own
  address, the one the control connection reached). Datagrams from anywhere else are dropped.
- Replies: from the original destination, through a transparent socket bound to that remote address
  and port, one per remote, shared by every session talking to it (reference-counted). Unconnected, so
  TPROXY's lookup of established sockets never takes a client's next datagram to it.

A session ends when idle for --udp-idle-timeout (either way), when the proxy closes its control
connection or refuses the association, or at shutdown; its sockets close with it.
"""

import errno
import ipaddress
import logging
import socket
import struct

import trio

from relay import fastpath
from relay.addresses import format_address
from relay.config import Config, ConfigError, Upstream
from relay.ends import errno_word, local_failure
from relay.logs import RateLimited, conn_log
from relay.net.dial import apply_mark, connect, resolve
from relay.net.faults import UpstreamError
from relay.net.listener import DEFAULT_LISTEN, ipv6_available
from relay.net.sockets import family_of, receive_some, write_all
from relay.proto.errors import ProtocolError, ProxyRefused
from relay.proto.socks import Socks5UdpAssociate
from relay.udp import datagram
from relay.udp.sessions import Refused, Session, SessionTable

IP_RECVORIGDSTADDR = 20  # Linux; also IP_ORIGDSTADDR, the ancillary message's type
IPV6_RECVORIGDSTADDR = 74
MAX_DATAGRAM = 65535
# The largest payload a UDP socket sends: 65535 less the IP and UDP headers (IPv6 has no header in its limit).
MAX_UDP_PAYLOAD = {socket.AF_INET: 65535 - 20 - 8, socket.AF_INET6: 65535 - 8}
_CMSG_SPACE = socket.CMSG_SPACE(28)  # a sockaddr_in6, the larger of the two
RECEIVE_BATCH = 32  # datagrams read in a row before other tasks run
# Receive buffers of the listeners and of each association's socket: a burst the relay's one thread has not
# read yet waits there rather than being dropped (the kernel doubles it and caps it at rmem_max without root).
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def enlarge_receive_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)  # past rmem_max, with CAP_NET_ADMIN
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


CONTROL_RECEIVE = 512  # a control connection carries nothing after the reply: anything is a fault
MAX_REMOTES_PER_SESSION = 256  # reply sockets one session may hold (one fd each)
REPLY_SOCKETS_PER_SESSION = 4  # reply sockets in all, per --udp-max-sessions: most sessions talk to one remote
# After a failed association, a client's datagrams are dropped this long (or until idle) before another try:
# a busy client must not open a connection to a refusing proxy per datagram.
FAILED_HOLD = 2.0


def original_destination(ancillary) -> tuple[str, int] | None:
    """The (address, port) a datagram was sent to, from its IP_ORIGDSTADDR / IPV6_ORIGDSTADDR message."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, address = struct.unpack_from("!2xH4s", data)
            return socket.inet_ntop(socket.AF_INET, address), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port, address = struct.unpack_from("!2xH4x16s", data)
            return socket.inet_ntop(socket.AF_INET6, address), port
    return None


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


class ReplySockets:
    """Transparent sockets bound to remote addresses, so replies leave from the address the client asked;
    one per remote, shared by the sessions that talk to it."""

    def __init__(self, mark: int | None, limit: int):
        self.mark = mark
        self.limit = limit  # sockets at once, whatever the proxy claims replies come from
        self._sockets: dict[tuple[str, int], list] = {}  # remote -> [socket, users]

    def __len__(self) -> int:
        return len(self._sockets)

    def acquire(self, remote: tuple[str, int]) -> socket.socket:
        held = self._sockets.get(remote)
        if held is not None:
            held[1] += 1
            return held[0]
        if len(self._sockets) >= self.limit:
            raise OSError(errno.ENFILE, f"{self.limit} reply sockets open already")
        sock = socket.socket(family_of(remote[0]), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            fastpath.set_transparent(sock)
            if self.mark is not None:
                apply_mark(sock, self.mark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # it sends only; what reaches it is stray
            sock.bind(remote)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sockets[remote] = [sock, 1]
        return sock

    def socket_for(self, remote: tuple[str, int]) -> socket.socket:
        """The socket an acquire() made for ``remote``, still held."""
        return self._sockets[remote][0]

    def release(self, remote: tuple[str, int]) -> None:
        held = self._sockets[remote]
        held[1] -= 1
        if not held[1]:
            del self._sockets[remote]
            held[0].close()


class Association:
    """The Trio side of one session: its control connection and its UDP socket to the proxy."""

    __slots__ = ("control", "udp", "relay_address", "scope", "failed")

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        self.failed = False  # the proxy could not be reached or refused: datagrams are dropped until it ends
        self.control = None
        self.udp: socket.socket | None = None
        self.relay_address: tuple[str, int] | None = None


class UdpService:
    def __init__(self, config: Config, metrics, clock=trio.current_time):
        self.config = config
        self.metrics = metrics
        self.table = SessionTable(
            config.udp_max_sessions, config.udp_max_per_source, config.udp_idle_timeout, clock=clock
        )
        self.replies = ReplySockets(config.mark, REPLY_SOCKETS_PER_SESSION * config.udp_max_sessions)
        self.listeners: list[socket.socket] = []
        self.warnings = RateLimited()
        self.deadline_step = min(1.0, config.udp_idle_timeout / 10)
        # Where every datagram is read: recvmsg() would allocate 64 KiB a call. One for all sockets, as each
        # datagram is relayed (or copied to a queue) before the next read, with no checkpoint between.
        self.buffer = memoryview(bytearray(MAX_DATAGRAM))
        self._nursery: trio.Nursery | None = None

    @property
    def upstream(self) -> Upstream:
        return self.config.udp_upstreams[0]

    def open(self) -> None:
        """Bind the transparent UDP listeners on the TCP listeners' addresses; raises ConfigError."""
        addresses = self.config.listen or [a for a in DEFAULT_LISTEN if ":" not in a[0] or ipv6_available()]
        try:
            for host, port in addresses:
                self.listeners.append(open_udp_listener(host, port))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sock in self.listeners:
                    nursery.start_soon(self.receive_from_clients, sock)
                task_status.started()
        finally:
            self.close()

    # -- client to proxy ---------------------------------------------------------

    async def receive_from_clients(self, sock: socket.socket) -> None:
        buffer = self.buffer
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECEIVE_BATCH):
                try:
                    size, ancillary, flags, client = sock.recvmsg_into([buffer], _CMSG_SPACE)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # an ICMP error for an earlier datagram, reported here
                destination = original_destination(ancillary)
                if destination is None or flags & socket.MSG_TRUNC:
                    self.metrics.udp_dropped("no-destination" if destination is None else "oversize")
                    continue
                self.from_client(client[:2], destination, buffer[:size])
            else:  # a full batch: let other tasks run before the next (waiting is a checkpoint already)
                await trio.lowlevel.checkpoint()

    def from_client(self, client: tuple[str, int], destination: tuple[str, int], payload: memoryview) -> None:
        """``payload`` is a view of the listener's buffer, valid until the next datagram is read."""
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
            session.handle = Association(trio.CancelScope(deadline=session.idle_deadline()))
            self._nursery.start_soon(self.run_session, session)
        session.active(self.table.clock())
        association: Association = session.handle
        self.extend(session)
        if association.failed:
            self.metrics.udp_dropped("no-association")
            return
        if association.udp is None:
            if not session.queue(destination, bytes(payload)):
                self.metrics.udp_dropped("queue-full")
            return
        self.send_up(session, destination, payload)

    def extend(self, session: Session) -> None:
        """Move the session's idle deadline on, in steps: a deadline moved per datagram is a heap update each."""
        scope = session.handle.scope
        deadline = session.idle_deadline()
        if deadline - scope.deadline > self.deadline_step:
            scope.deadline = deadline + self.deadline_step  # at most a step late, never early

    def send_up(self, session: Session, destination: tuple[str, int], payload: bytes | memoryview) -> None:
        association: Association = session.handle
        message = datagram.header(destination[0], destination[1]) + payload  # one copy
        if len(message) > MAX_UDP_PAYLOAD[association.udp.family]:
            self.metrics.udp_dropped("oversize")
            return
        try:
            association.udp.sendto(message, association.relay_address)
        except BlockingIOError:
            self.metrics.udp_dropped("send-blocked")
            return
        except OSError as exc:
            self.metrics.udp_dropped("oversize" if exc.errno == errno.EMSGSIZE else "send-failed")
            return
        session.sent_up(len(payload))
        self.metrics.udp_relayed("up", len(payload))

    # -- a session ---------------------------------------------------------------

    async def run_session(self, session: Session) -> None:
        association: Association = session.handle
        ended = "shutdown"  # cancelled from outside: the relay is stopping
        try:
            with association.scope:
                ended = await self.associate_and_relay(session, association)
                if association.udp is None:  # no association: the client's datagrams are dropped a while,
                    association.failed = True  # rather than each opening a connection to the proxy
                    if association.control is not None:
                        association.control.close()
                        association.control = None
                    await trio.sleep(FAILED_HOLD)
            if association.scope.cancelled_caught and not association.failed:
                ended = "idle"  # only the idle deadline cancels the session's own scope
        finally:
            for sock in (association.udp, association.control):
                if sock is not None:
                    sock.close()
            for remote in session.remotes:
                self.replies.release(remote)
            session.remote_count = len(session.remotes)
            session.remotes.clear()
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
        """Open the association, then relay until the proxy ends it; returns how it ended (the idle
        deadline and shutdown end it by cancellation instead)."""
        upstream = self.upstream
        config = self.config
        try:
            with trio.fail_after(config.connect_timeout + config.handshake_timeout):
                addresses = await resolve(upstream.host, upstream.port)
                association.control = await connect(addresses, mark=config.mark, timeout=config.connect_timeout)
                relay_address = await self.handshake(association.control, upstream)
        except trio.TooSlowError:
            self.proxy_failed("timed out opening the association")
            return "timeout"
        except UpstreamError as exc:
            self.proxy_failed(str(exc))
            return exc.reason  # connect-econnrefused, ... or relay-emfile when out of fds
        except OSError as exc:
            self.proxy_failed(exc.strerror or str(exc))
            return "connect-" + errno_word(exc.errno)
        except ProtocolError as exc:
            self.proxy_failed(str(exc))
            return "refused" if isinstance(exc, ProxyRefused) else "proxy-protocol-error"
        try:
            association.udp = udp = socket.socket(family_of(relay_address[0]), socket.SOCK_DGRAM)
            if config.mark is not None:
                apply_mark(udp, config.mark)
            enlarge_receive_buffer(udp)
            udp.setblocking(False)
        except OSError as exc:  # out of fds: this session fails, the others go on
            self.warnings.warning(f"udp-socket:{exc.errno}", f"UDP: cannot open a socket: {exc.strerror}")
            return local_failure(exc.errno)
        association.relay_address = relay_address
        while session.queued:
            self.send_up(session, *session.queued.popleft())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive_from_proxy, session, association)
            ended = await self.watch_control(association)
            nursery.cancel_scope.cancel()
        return ended

    async def handshake(self, control, upstream: Upstream) -> tuple[str, int]:
        password = upstream.password.reveal() if upstream.password else None
        machine = Socks5UdpAssociate(upstream.username, password)
        while not machine.established:
            outgoing = machine.data_to_send()
            if outgoing:
                await write_all(control, outgoing)
            machine.receive_data(await receive_some(control, 4096))
        host, port = machine.bound_address
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ProtocolError(f"the proxy named {host!r}, not an address, as its UDP relay") from None
        if address.is_unspecified:
            host = control.getpeername()[0]  # RFC 1928: the proxy's own address, where we reached it
        if port == 0:
            raise ProtocolError("the proxy named port 0 as its UDP relay")
        return host, port

    def proxy_failed(self, reason: str) -> None:
        self.warnings.warning(f"udp-associate:{reason}", f"UDP: no association through {self.upstream}: {reason}")

    async def watch_control(self, association: Association) -> str:
        """Until the proxy closes the control connection (or sends on it, which RFC 1928 has no use for)."""
        data = await receive_some(association.control, CONTROL_RECEIVE)
        return "proxy-closed" if not data else "proxy-protocol-error"

    # -- proxy to client ---------------------------------------------------------

    async def receive_from_proxy(self, session: Session, association: Association) -> None:
        udp = association.udp
        buffer = self.buffer
        expected = association.relay_address
        expected_key = _address_key(expected)
        while True:
            await trio.lowlevel.wait_readable(udp)
            for _ in range(RECEIVE_BATCH):
                try:
                    size, source = udp.recvfrom_into(buffer)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                if source[:2] != expected and _address_key(source) != expected_key:
                    self.metrics.udp_dropped("foreign-source")
                    continue
                try:
                    host, port, payload = datagram.decode(buffer[:size])
                except datagram.BadDatagram as exc:
                    self.metrics.udp_dropped(exc.reason)
                    continue
                self.send_down(session, (host, port), payload)
            else:
                await trio.lowlevel.checkpoint()

    def send_down(self, session: Session, remote: tuple[str, int], payload: bytes) -> None:
        client = session.client
        if remote not in session.remotes:
            if family_of(remote[0]) != family_of(client[0]):
                self.metrics.udp_dropped("wrong-family")
                return
            if len(session.remotes) >= MAX_REMOTES_PER_SESSION:
                self.metrics.udp_dropped("remotes-full")
                return
            try:
                self.replies.acquire(remote)
            except OSError as exc:
                self.metrics.udp_dropped("reply-socket")
                self.warnings.warning(f"udp-reply:{exc.errno}", f"UDP: cannot open a reply socket: {exc.strerror}")
                return
            session.remotes.add(remote)
        sock = self.replies.socket_for(remote)
        try:
            sock.sendto(payload, client)
        except OSError:
            self.metrics.udp_dropped("send-failed")
            return
        session.active(self.table.clock())
        self.extend(session)
        session.sent_down(len(payload))
        self.metrics.udp_relayed("down", len(payload))


def _address_key(address) -> tuple[bytes, int]:
    """An address comparable whatever its spelling (compressed IPv6, a scope id)."""
    return ipaddress.ip_address(address[0].split("%")[0]).packed, address[1]
