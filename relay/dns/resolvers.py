"""Where the DNS service's questions are answered: DNS resolvers over UDP (direct), TCP and DoH (both
through the relay's upstream proxy, like relayed connections), in order, with health.

A TCP or DoH resolver keeps one connection open for every query: several in
flight at once, answered in any order. Each such connection runs as a Trio
system task (a reader and a writer): it is shared by the queries and outlives
each of them, and nothing else owns it. ``aclose`` ends it; so does the end of
the Trio run.
"""

import secrets
import socket
import ssl
from typing import Protocol

import trio

from relay.config import RESOLV_CONF, DnsUpstream, local_dns_upstreams, parse_dns_upstream
from relay.dns import doh
from relay.dns.framing import FrameError, Framer, frame
from relay.dns.message import response_matches, upstream_query
from relay.dns.split import goes_local
from relay.dns.wire import Key
from relay.logs import log
from relay.net.dial import apply_mark, connect
from relay.net.faults import UpstreamError
from relay.net.sockets import family_of
from relay.net.tls import tunnel_stream

MAX_TCP_IN_FLIGHT = 100  # queries pipelined on one TCP connection
RECEIVE_SIZE = 65536
UDP_RESEND_AFTER = 1.0  # a lost datagram is sent again rather than waited for until the timeout
PING_WAIT = 1.0  # an HTTP/2 PING unanswered this long: the connection is given up
KEEP_WARM = 300.0  # seconds after a query during which a resolver's closed connection is reopened at once
REOPEN_TIMEOUT = 10.0
DOWN_FOR = 30.0  # seconds a resolver that failed again and again is skipped while another one answers
SERVFAIL, REFUSED = 2, 5


class ResolverError(Exception):
    """No answer from a resolver: ``reason`` is a short word for logs and metrics."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Resolver(Protocol):
    url: str

    async def resolve(self, key, timeout: float) -> bytes: ...

    async def aclose(self) -> None: ...


def make_resolver(upstream: DnsUpstream | str, *, pool, dialer, config, tunnels: "Tunnels | None" = None) -> Resolver:
    """The resolver for a --dns-upstream (udp://, tcp:// or https://); ``tunnels``: shared ones, which a
    reload can point at a new pool."""
    if isinstance(upstream, str):
        upstream = parse_dns_upstream(upstream)
    if upstream.scheme == "udp":
        return UdpResolver(upstream, mark=config.mark)
    tunnel = tunnels or Tunnels(pool, dialer, config)
    if upstream.scheme == "tcp":
        return TcpResolver(upstream, tunnel)
    return DohResolver(upstream, tunnel, ssl_context(config.dns_ca))


def ssl_context(cafile: str | None) -> ssl.SSLContext:
    """Certificates checked against ``cafile`` (None: the system's CAs); HTTP/2 only.

    An https://IP/ upstream is checked against the certificate's IP address
    entries: given an IP literal as server_hostname, Python's ssl matches it
    with the certificate's iPAddress SANs (and sends no SNI, as RFC 6066 wants).
    """
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    return context


async def within(timeout: float, url: str, operation):
    """``await operation()``, or ResolverError("timeout") once ``timeout`` has passed."""
    with trio.move_on_after(timeout):
        return await operation()
    raise ResolverError(f"no answer from {url} within {timeout:g} s", "timeout")


# -- udp:// -----------------------------------------------------------------------------


class UdpResolver:
    """A datagram socket per query (a random source port; a random ID): an answer that does not match
    is dropped and the wait goes on; one truncated (TC) is asked again over TCP, directly."""

    def __init__(self, upstream: DnsUpstream, *, mark: int | None):
        self.url = str(upstream)
        self.address = (upstream.host, upstream.port)
        self.mark = mark

    async def resolve(self, key, timeout: float) -> bytes:
        return await within(timeout, self.url, lambda: self._resolve(key, trio.current_time() + timeout))

    async def _resolve(self, key, deadline: float) -> bytes:
        query_id = secrets.randbelow(65536)
        query = upstream_query(key, id=query_id)
        with trio.socket.socket(family_of(self.address[0]), socket.SOCK_DGRAM) as sock:
            if self.mark is not None:
                apply_mark(sock, self.mark)
            try:
                await sock.connect(self.address)  # only its answers reach this socket
                while True:
                    await sock.send(query)
                    with trio.move_on_after(UDP_RESEND_AFTER):
                        while True:
                            response = await sock.recv(RECEIVE_SIZE)
                            if response_matches(key, query_id, response):
                                break
                        if response[2] & 0x02:  # TC: the whole answer comes over TCP
                            return await self._over_tcp(key, deadline)
                        return response
            except OSError as exc:  # e.g. ICMP port unreachable: nobody listens there
                raise ResolverError(f"{self.url}: {exc.strerror or exc}", "unreachable") from None

    async def _over_tcp(self, key, deadline: float) -> bytes:
        try:
            sock = await connect(
                [(family_of(self.address[0]), self.address)],
                mark=self.mark,
                timeout=max(deadline - trio.current_time(), 0.001),
            )
        except UpstreamError as exc:
            raise ResolverError(f"{self.url} over TCP: {exc}", exc.reason) from None
        query_id = secrets.randbelow(65536)
        async with trio.SocketStream(sock) as stream:
            try:
                await stream.send_all(frame(upstream_query(key, id=query_id)))
                framer = Framer()
                while True:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise ResolverError(f"{self.url} closed the TCP connection unanswered", "closed")
                    for response in framer.receive_data(data):
                        if response_matches(key, query_id, response):
                            return response
            except (OSError, trio.BrokenResourceError, FrameError) as exc:
                raise ResolverError(f"{self.url} over TCP: {exc}", "closed") from None

    async def aclose(self) -> None:
        pass


# -- the proxy tunnel, and a connection kept open through it ----------------------------


class Tunnels:
    """Tunnels to a resolver, opened like relayed connections': each healthy upstream proxy in order,
    a proxy's failure counting against its health."""

    def __init__(self, pool, dialer, config):
        self.pool, self.dialer, self.config = pool, dialer, config

    async def open(self, target: tuple[str, int], url: str) -> trio.abc.Stream:
        last: UpstreamError | None = None
        for state in self.pool.candidates():
            try:
                sock, early = await self.dialer.open_async(
                    state.upstream,
                    state.addresses,
                    target,
                    mark=self.config.mark,
                    connect_timeout=self.config.connect_timeout,
                    handshake_timeout=self.config.handshake_timeout,
                )
            except UpstreamError as exc:
                last = exc
                self.pool.metrics.attempt_failed(str(state.upstream), exc.fault.value)
                if not exc.proxy_fault:
                    break  # the proxy answered: it cannot reach the resolver, nor would the next one
                self.pool.failed(state, exc)
                continue
            self.pool.succeeded(state)
            if early:  # a DNS or TLS server does not speak first
                sock.close()
                raise ResolverError(f"{url} sent bytes before the query", "protocol-error")
            return tunnel_stream(sock)
        if last is None:
            raise ResolverError(f"no healthy upstream proxy to reach {url}", "no-healthy-upstream")
        raise ResolverError(f"cannot reach {url}: {last}", last.reason)


class Waiter:
    """One query's wait for its answer."""

    __slots__ = ("event", "answer", "error")

    def __init__(self):
        self.event = trio.Event()
        self.answer: bytes | None = None
        self.error: ResolverError | None = None

    def answered(self, answer: bytes) -> None:
        if not self.event.is_set():
            self.answer = answer
            self.event.set()

    def failed(self, error: ResolverError) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> bytes:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.answer


class Session:
    """One connection to a resolver shared by many queries: a reader and a writer in a system task.

    Subclasses turn what comes in into answers (``received``) and say what to
    send (``outgoing``); queries only queue bytes and wait, so a query that is
    cancelled never leaves a half-written message behind.
    """

    def __init__(self, stream: trio.abc.Stream, url: str):
        self.stream, self.url = stream, url
        self.waiters: dict[int, Waiter] = {}
        self.alive = True
        self.error: ResolverError | None = None  # why it ended
        self.heard_at = trio.current_time()  # when the server last sent anything
        self._wake_writer = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()  # queries waiting for room on this connection
        self._scope = trio.CancelScope()
        self.on_end = None  # called with this session once it has ended
        trio.lowlevel.spawn_system_task(self._run, name=f"dns session {url}")

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_failure, self._write, nursery)
                    await self._until_failure(self._read, nursery)
        finally:
            self.alive = False
            self.fail_all(self.error or ResolverError(f"{self.url}: the connection was closed", "closed"))
            try:
                await trio.aclose_forcefully(self.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            if self.on_end is not None:
                self.on_end(self)

    async def _until_failure(self, part, nursery) -> None:
        """Run the reader or the writer; when it ends, the other ends too, and ``error`` says why."""
        try:
            await part()
        except ResolverError as exc:
            self.error = self.error or exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            why = f"{exc.__cause__ or exc}" if isinstance(exc, trio.BrokenResourceError) else f"{exc}"
            self.error = self.error or ResolverError(f"{self.url}: the connection failed: {why}", "closed")
        except Exception as exc:  # a bug must cost this connection only: a system task must not raise
            log.exception("internal error on the connection to %s", self.url)
            self.error = self.error or ResolverError(f"{self.url}: internal error: {exc}", "internal-error")
        nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ResolverError(f"{self.url} closed the connection", "closed")
            self.heard_at = trio.current_time()
            self.received(data)
            self.wake()

    async def _write(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            data = self.outgoing()
            if data:
                await self.stream.send_all(data)

    def wake(self) -> None:
        """Something to send, or room for queries that waited."""
        self._wake_writer.set()
        self._changed.unpark_all()

    async def wait_for_room(self) -> None:
        await self._changed.park()

    def fail_all(self, error: ResolverError) -> None:
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            waiter.failed(error)
        self._changed.unpark_all()

    @property
    def accepting(self) -> bool:
        """New queries may be sent on it."""
        return self.alive

    def given_up(self, asked_at: float) -> None:
        """A query asked at ``asked_at`` went unanswered. If the server has sent nothing since, the path
        may be dead without a FIN or RST (a blackholed tunnel), which TCP would notice only after many
        minutes: ``probe`` it."""
        if self.heard_at < asked_at:
            self.probe()

    def probe(self) -> None:
        """DNS over TCP has no ping: a connection that went silent is closed, the next query opens another."""
        self.close()

    def close(self) -> None:
        self.alive = False
        self._scope.cancel()

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def outgoing(self) -> bytes:
        raise NotImplementedError


class Sessions:
    """The one open session of a resolver: opened on the first query, again after it ended.

    Servers close connections that sat idle (unbound after 30 s); the next query would then wait for a
    new one, several round trips through the tunnel. So a session that ends after serving a query asked in
    the last KEEP_WARM seconds is replaced at once, in the background; one that ends unused is not.
    """

    def __init__(self, url: str, open_session):
        self.url = url
        self._open_session = open_session
        self._lock = trio.Lock()
        self.session: Session | None = None
        self.opened = 0  # connections opened so far
        self.used_at = float("-inf")
        self.used = False  # whether the current session served a query
        self.closed = False

    async def get(self) -> Session:
        self.used_at = trio.current_time()
        session = self.session
        if session is None or not session.accepting or self._lock.locked():  # else no lock: no turn given away
            session = await self._current()
        self.used = True
        return session

    async def _current(self) -> Session:
        async with self._lock:
            if self.session is None or not self.session.accepting:
                if self.session is not None:
                    self.session.close()
                self.session = await self._open_session()
                self.session.on_end = self._ended
                self.opened += 1
            return self.session

    def _ended(self, session: Session) -> None:
        if session is self.session and not self.closed and self.used and trio.current_time() - self.used_at < KEEP_WARM:
            self.used = False
            trio.lowlevel.spawn_system_task(self._reopen, name=f"dns session {self.url} reopened")

    async def _reopen(self) -> None:
        with trio.move_on_after(REOPEN_TIMEOUT):
            try:
                await self._current()
            except Exception as exc:  # the next query tries again, and says why if it fails too
                log.debug("DNS: reopening the connection to %s failed: %s", self.url, exc)
        if self.closed:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.session is not None:
            self.session.close()
            self.session = None


# -- tcp:// ----------------------------------------------------------------------------------


class TcpSession(Session):
    def __init__(self, stream, url: str):
        super().__init__(stream, url)
        self.framer = Framer()
        self.queue: list[bytes] = []
        self.keys: dict[int, tuple] = {}

    def received(self, data: bytes) -> None:
        try:
            responses = self.framer.receive_data(data)
        except FrameError as exc:
            raise ResolverError(f"{self.url}: {exc}", "protocol-error") from None
        for response in responses:
            query_id = int.from_bytes(response[:2], "big")
            waiter, key = self.waiters.get(query_id), self.keys.get(query_id)
            if waiter is not None and response_matches(key, query_id, response):
                self.forget(query_id)
                waiter.answered(response)

    def outgoing(self) -> bytes:
        data, self.queue = b"".join(self.queue), []
        return data

    def forget(self, query_id: int) -> None:
        self.waiters.pop(query_id, None)
        self.keys.pop(query_id, None)

    async def query(self, key) -> bytes:
        while len(self.waiters) >= MAX_TCP_IN_FLIGHT and self.alive:
            await self.wait_for_room()
        if not self.alive:
            raise ResolverError(f"{self.url} closed the connection", "closed")
        query_id = secrets.randbelow(65536)
        while query_id in self.waiters:
            query_id = secrets.randbelow(65536)
        waiter = self.waiters[query_id] = Waiter()
        self.keys[query_id] = key
        self.queue.append(frame(upstream_query(key, id=query_id)))
        self.wake()
        asked_at = trio.current_time()
        try:
            return await waiter.wait()
        finally:
            if self.waiters.get(query_id) is waiter:
                self.forget(query_id)
                self.given_up(asked_at)
            self.wake()


class TcpResolver:
    """DNS over TCP through the proxy: one connection, queries pipelined on it, matched by ID."""

    def __init__(self, upstream: DnsUpstream, tunnels: Tunnels):
        self.url = str(upstream)
        self.target = (upstream.host, upstream.port)
        self.tunnels = tunnels
        self.sessions = Sessions(self.url, self._open)

    async def _open(self) -> TcpSession:
        return TcpSession(await self.tunnels.open(self.target, self.url), self.url)

    async def resolve(self, key, timeout: float) -> bytes:
        return await within(timeout, self.url, lambda: self._resolve(key))

    async def _resolve(self, key) -> bytes:
        session = await self.sessions.get()
        return await session.query(key)

    async def aclose(self) -> None:
        self.sessions.close()


# -- https:// (DoH) ------------------------------------------------------------------------


class DohSession(Session):
    def __init__(self, stream, url: str, client: doh.DohClient):
        self.client = client
        self.pinged_at: float | None = None
        super().__init__(stream, url)
        self.wake()  # the connection preface

    def received(self, data: bytes) -> None:
        try:
            outcomes = self.client.receive_data(data)
        except doh.DohError as exc:
            raise ResolverError(f"{self.url}: {exc}", exc.reason) from None
        for outcome in outcomes:
            waiter = self.waiters.pop(outcome.stream_id, None)
            if waiter is None:
                continue
            if isinstance(outcome, doh.Answer):
                waiter.answered(outcome.body)
            else:
                waiter.failed(ResolverError(f"{self.url}: {outcome.message}", outcome.reason))
        if not self.client.accepting and not self.client.in_flight:
            raise ResolverError(f"{self.url} closed the connection", "h2-goaway")

    def outgoing(self) -> bytes:
        return self.client.data_to_send()

    @property
    def accepting(self) -> bool:
        return self.alive and self.client.accepting and not self.unresponsive

    @property
    def unresponsive(self) -> bool:
        """A PING has gone unanswered for PING_WAIT: queries go to a new connection."""
        pinged_at = self.pinged_at
        return pinged_at is not None and self.heard_at < pinged_at and trio.current_time() - pinged_at >= PING_WAIT

    def probe(self) -> None:
        """A server that is alive but slow on one query answers a PING at once."""
        if self.pinged_at is None or self.heard_at >= self.pinged_at:
            self.pinged_at = trio.current_time()
            self.client.ping()
            self.wake()

    async def query(self, wire: bytes) -> bytes:
        while self.accepting and not self.client.can_start():
            await self.wait_for_room()
        if not self.accepting:
            raise ResolverError(f"{self.url} closed the connection", "closed")
        try:
            stream_id = self.client.start_query(wire)
        except doh.DohError as exc:  # out of stream IDs: the next query opens another connection
            raise ResolverError(f"{self.url}: {exc}", exc.reason) from None
        waiter = self.waiters[stream_id] = Waiter()
        self.wake()
        asked_at = trio.current_time()
        try:
            return await waiter.wait()
        finally:
            if self.waiters.pop(stream_id, None) is not None:  # given up on: reset its stream
                self.client.cancel(stream_id)
                self.given_up(asked_at)
            self.wake()


class DohResolver:
    """DNS over HTTPS (RFC 8484 POST) through the proxy: one HTTP/2 connection, many streams on it."""

    def __init__(self, upstream: DnsUpstream, tunnels: Tunnels, context: ssl.SSLContext):
        self.url = str(upstream)
        self.host = upstream.host
        self.target = (upstream.host, upstream.port)
        authority = upstream.host if ":" not in upstream.host else f"[{upstream.host}]"
        self.authority = authority if upstream.port == 443 else f"{authority}:{upstream.port}"
        self.path = upstream.path
        self.tunnels = tunnels
        self.context = context
        self.sessions = Sessions(self.url, self._open)

    async def _open(self) -> DohSession:
        tcp = await self.tunnels.open(self.target, self.url)
        stream = trio.SSLStream(tcp, self.context, server_hostname=self.host, https_compatible=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, ssl.CertificateError) as exc:
            await trio.aclose_forcefully(stream)
            reason = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
            raise ResolverError(f"TLS with {self.url} failed: {reason}", "tls") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if stream.selected_alpn_protocol() != "h2":
            await trio.aclose_forcefully(stream)
            raise ResolverError(f"{self.url} does not speak HTTP/2 (ALPN h2)", "no-h2")
        return DohSession(stream, self.url, doh.DohClient(self.authority, self.path))

    async def resolve(self, key, timeout: float) -> bytes:
        return await within(timeout, self.url, lambda: self._resolve(key))

    async def _resolve(self, key) -> bytes:
        session = await self.sessions.get()
        answer = await session.query(upstream_query(key, id=0))  # ID 0: RFC 8484 4.1, for HTTP caches
        if not response_matches(key, 0, answer):
            raise ResolverError(f"{self.url} answered something else than a DNS answer to the query", "mismatch")
        return answer

    async def aclose(self) -> None:
        self.sessions.close()


# -- in order, with health ---------------------------------------------------------------------


class Resolvers:
    """The resolvers in order: the first healthy one answers. ``failures`` failures in a row put one
    aside for DOWN_FOR seconds while another is healthy. An upstream SERVFAIL or REFUSED is passed
    on only when no later resolver answers better. The timeout bounds everything: each resolver gets
    its share of what is left, so a silent first one leaves time for the next."""

    def __init__(self, resolvers: list[Resolver], failures: int = 3, clock=trio.current_time):
        self.resolvers = resolvers
        self.failures = failures
        self.clock = clock
        self._in_a_row = [0] * len(resolvers)
        self._down_until = [0.0] * len(resolvers)

    def order(self) -> list[int]:
        now = self.clock()
        up = [index for index in range(len(self.resolvers)) if self._down_until[index] <= now]
        return up or list(range(len(self.resolvers)))  # all down: try them all rather than none

    async def resolve(self, key, timeout: float) -> bytes:
        deadline = trio.current_time() + timeout
        order = self.order()
        last_error = ResolverError("no DNS upstream", "no-upstream")
        fallback: bytes | None = None
        for position, index in enumerate(order):
            left = deadline - trio.current_time()
            if left <= 0:
                break
            resolver = self.resolvers[index]
            try:
                answer = await resolver.resolve(key, left / (len(order) - position))
            except ResolverError as exc:
                last_error = exc
                self._failed(index, exc)
                continue
            self._in_a_row[index] = 0
            if answer[3] & 0x0F not in (SERVFAIL, REFUSED):
                return answer
            fallback = answer
        if fallback is not None:
            return fallback
        raise last_error

    def _failed(self, index: int, error: ResolverError) -> None:
        self._in_a_row[index] += 1
        if self._in_a_row[index] >= self.failures and self._down_until[index] <= self.clock():
            self._down_until[index] = self.clock() + DOWN_FOR
            log.warning(
                "DNS upstream %s is skipped for %g s: %d failures in a row, the last: %s",
                self.resolvers[index].url,
                DOWN_FOR,
                self._in_a_row[index],
                error,
            )

    async def aclose(self) -> None:
        for resolver in self.resolvers:
            await resolver.aclose()


# -- split: the LAN's own resolvers or the far side's -----------------------------------------


class SplitResolvers:
    """Each question asked of the far side's resolvers or of the LAN's, as relay.dns.split.goes_local says for
    ``config``'s --dns-local-domain and --bypass-domain; the same ``resolve`` and ``aclose`` as Resolvers.
    A local question that fails is not asked of the far side: that would tell the far side the LAN's names and
    addresses, and get no answer the LAN wants. A reload may give it a new ``config``."""

    def __init__(self, far: Resolvers, local: Resolvers, config):
        self.far, self.local = far, local
        self.config = config

    def goes_local(self, key: Key) -> bool:
        return goes_local(key, self.config.dns_local_domain, self.config.bypass_domain)

    async def resolve(self, key, timeout: float) -> bytes:
        resolvers = self.local if self.goes_local(key) else self.far
        return await resolvers.resolve(key, timeout)

    async def aclose(self) -> None:
        try:
            await self.far.aclose()
        finally:
            await self.local.aclose()


def make_resolvers(
    config, *, pool, dialer, tunnels: Tunnels | None = None, resolv_conf: str = RESOLV_CONF
) -> SplitResolvers:
    """The DNS service's resolvers: --dns-upstream, and --dns-local (by default the nameservers in
    ``resolv_conf``, read now) for names under --dns-local-domain or --bypass-domain and local reverse names.
    ``tunnels``, as for make_resolver: shared ones, which a reload can point at a new pool.

    Raises ConfigError, before anything is made, when there is no local resolver (see
    relay.config.local_dns_upstreams).
    """
    local = local_dns_upstreams(config, resolv_conf)

    def in_order(upstreams: list[DnsUpstream]) -> Resolvers:
        return Resolvers(
            [
                make_resolver(upstream, pool=pool, dialer=dialer, config=config, tunnels=tunnels)
                for upstream in upstreams
            ]
        )

    return SplitResolvers(in_order(config.dns_upstream), in_order(local), config)
