"""Plain HTTP through an HTTP proxy, request by request, in absolute form.

h11 parses both sides: the client's requests (we are its server) and the
proxy's responses (we are its client). Once a head tells a body's length, or
a chunk's, the bytes h11 need not see are spliced from socket to socket
(relay.proto.http_body); the rest streams through h11 in events of at most
READ_SIZE bytes. A side is only read when the next event is needed, so memory
stays bounded and a slow reader slows the sender. The request body
and the response run concurrently, which is what ``Expect: 100-continue`` and
early error responses need; once the body is sent, the client is watched until
the response is complete, so that its leaving ends the exchange at once.

A kept-alive proxy connection is reused only if the proxy has not closed it
meanwhile, nor sent anything after its response. If it closes anyway as the
next request goes out (the two cross), a request that is idempotent and has
no body is sent once more on a new connection, as RFC 9112 (9.3.1) allows,
provided nothing of a response reached the client yet.
"""

import contextlib
import socket

import h11
import trio

from relay import ends, fastpath
from relay.config import Config
from relay.net.dial import connect
from relay.net.faults import UpstreamError, handshake_failure, handshake_timed_out
from relay.net.sockets import closed_by_peer, reset, write_all
from relay.net.tls import TlsProxy, secured
from relay.proto.http_body import framing, passable, passed
from relay.proto.http_connect import basic_credentials
from relay.proto.http_forward import (
    EmptyLines,
    absolute_form,
    authority,
    bad_request,
    forwardable_upgrade,
    forwarded_response,
    needs_tunnel,
)
from relay.proto.sniff import MAX_SNIFF_BYTES, hostname_from_authority

READ_SIZE = 65536
# A body (or chunk) with less than this left comes through h11 with the next read: splicing it
# would cost more calls than the copy.
PASS_MIN = 16384
# The read after a splice: the last byte, a chunk's CRLF and the next chunk's header, which h11 must
# see, but little of the next chunk's data, which can then be spliced too.
AFTER_PASS_READ = 512
# A spliced body is read in batches of this much (SO_RCVLOWAT), or what came within BATCH_WAIT.
BATCH = 1 << 20
BATCH_WAIT = 0.05
# 1xx responses to one request: more than a real exchange sends (one 100 Continue, a few 103 Early Hints).
MAX_INFORMATIONAL = 32
MAX_HEAD = 16384
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# How a reused proxy connection ends when the proxy closed it as our request went out.
CROSSED_CLOSE = frozenset({ends.PROXY_CLOSED, ends.UPSTREAM_RESET})
# After a 400, what the client still sends is read and dropped this long (at most this much), so that
# closing with unread bytes does not reset the connection before the client has read the answer.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


class NeedsTunnel(Exception):
    """The first request cannot go in absolute form: tunnel ``data`` (all bytes read so far) instead."""

    def __init__(self, data: bytes):
        super().__init__("request needs a CONNECT tunnel")
        self.data = data


class Switched(Exception):
    """The proxy switched protocols (a 101 to a forwarded upgrade): from here on the connection is a
    tunnel, whose bytes the pump moves as any other's. ``proxy`` is its socket (the caller's now),
    ``to_proxy`` and ``to_client`` the bytes each side sent past the 101, read already."""

    def __init__(self, proxy, to_proxy: bytes, to_client: bytes):
        super().__init__("switched protocols")
        self.proxy, self.to_proxy, self.to_client = proxy, to_proxy, to_client


class ForwardFailed(Exception):
    """The exchange broke off; ``ended`` says how, as in the per-connection log line. ``clean``: the
    client was told (a 400) and its connection ends with a FIN, not a reset."""

    def __init__(self, ended: str, clean: bool = False):
        super().__init__(ended)
        self.ended, self.clean = ended, clean


class HttpForwarder:
    """Serves one client connection. ``open_proxy(fresh)`` is an async callable that returns a
    connected socket to the proxy and whether it served another client before (never when
    ``fresh``), or raises UpstreamError; ``keep_proxy(sock)``, if given, takes the proxy connection
    when the client is done with it between two exchanges (False: the forwarder closes it)."""

    def __init__(
        self,
        client,
        first: bytes,
        dst,
        open_proxy,
        *,
        usable_name,
        proxy_authorization,
        idle_timeout,
        forward_upgrades=False,
        keep_proxy=None,
        pipe_size=0,
    ):
        self.client = client
        self.dst = dst
        self.open_proxy = open_proxy
        self.keep_proxy = keep_proxy
        self.usable_name = usable_name  # the Host header's name, or None to ask by address
        self.proxy_authorization = proxy_authorization
        self.idle_timeout = idle_timeout
        self.forward_upgrades = forward_upgrades  # --http-upgrade forward
        self.pipe_size = pipe_size
        # The SO_RCVLOWAT set on the source of the body being spliced, down and up (0: none): both may be at once.
        self.batching = [0, 0]
        self.switched = False  # the proxy answered an upgrade with 101: the connection is a tunnel now
        self.from_client = self.empty_lines = None
        self._next_request(first, closed=False)
        self.unparsed = bytearray(first)  # until the first request is accepted: replayed if we must tunnel
        self.proxy = None
        self.to_proxy = None
        self.sent_up = 0
        self.sent_down = 0
        self.spliced = 0  # body bytes that went by h11, socket to socket
        self.read_size = {True: READ_SIZE, False: READ_SIZE}  # the next read from the client (True) / the proxy
        self.requests = 0
        self.failing = None  # how the exchange failed, as soon as either task knows
        self.refusal = 400  # the status a client protocol error is answered with
        self.answering = False  # the proxy sent a byte of its answer to the current request
        self.idle = trio.CancelScope()

    def _next_request(self, data: bytes, closed: bool) -> None:
        """A parser for the client's next request, fed what was read past the last one. A new
        one each time: only a parser in its first state may be fed the skipped empty lines' rest."""
        self.from_client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.empty_lines = EmptyLines()
        if data:  # b"" would mean the end of data to h11
            self._from_client_data(data)
        if closed:
            self.from_client.receive_data(b"")

    def _from_client_data(self, data: bytes) -> None:
        parsed = self.empty_lines.feed(data)
        if parsed or not data:  # b"" means the end of data to h11
            self.from_client.receive_data(parsed)

    def touch(self):
        self.idle.deadline = trio.current_time() + self.idle_timeout

    def fail(self, ended: str, refusal: int = 400) -> ForwardFailed:
        """Record the failure (the first one counts); call before the task can yield."""
        if self.failing is None:
            self.failing, self.refusal = ended, refusal
        return ForwardFailed(self.failing)

    def check_end(self, data: bytes) -> None:
        """An end of data read while the exchange is failing may be a reset the other task took."""
        if not data and self.failing is not None:
            raise ForwardFailed(self.failing)

    async def client_event(self):
        while True:
            event = self.from_client.next_event()
            if event is not h11.NEED_DATA:
                return event
            if await self._pass_body(self.client, self.proxy, self.from_client, self.to_proxy, up=True):
                continue
            try:
                data = await self.client.recv(self._next_read(up=True))
            except OSError:
                raise self.fail(ends.CLIENT_RESET) from None
            self.check_end(data)
            self.touch()
            if self.unparsed is not None and len(self.unparsed) <= MAX_SNIFF_BYTES:
                self.unparsed += data
            self._from_client_data(data)

    async def proxy_event(self):
        while True:
            event = self.to_proxy.next_event()
            if event is not h11.NEED_DATA:
                return event
            if await self._pass_body(self.proxy, self.client, self.to_proxy, self.from_client, up=False):
                continue
            try:
                data = await self.proxy.recv(self._next_read(up=False))
            except OSError:
                raise self.fail(ends.UPSTREAM_RESET) from None
            self.check_end(data)
            if not data and not self.answering:
                raise self.fail(ends.PROXY_CLOSED)  # before a byte of the answer: maybe it crossed our request
            self.answering = True
            self.touch()
            self.to_proxy.receive_data(data)

    async def _pass_body(self, source, sink, receiving, sending, up: bool) -> bool:
        """Splice what ``receiving`` (h11, reading ``source``) need not see of its body to ``sink``,
        framed as ``sending`` (h11, writing ``sink``) would; False if nothing may pass (read as usual).
        An end of data midway is fed to ``receiving``, which tells the body cut short as ever."""
        if isinstance(self.proxy, TlsProxy):  # TLS to the proxy: its bytes cannot be spliced here
            return False
        count = passable(receiving)
        if count < PASS_MIN:
            return False
        frame = framing(sending, count)
        if frame is None:
            return False
        before, after = frame
        source_reset, sink_reset = ends.RESET_BY if up else ends.RESET_BY[::-1]
        await self._write(sink, before, sink_reset, up)
        left = count
        written = 0  # what reached the sink, as of the last move() that returned
        conduit = fastpath.Conduit(source.fileno(), sink.fileno(), self.pipe_size)
        try:
            while True:
                try:
                    taken = conduit.move(left)
                except OSError as exc:
                    if conduit.failed_side < 0:
                        raise self.fail(ends.local_failure(exc.errno)) from None
                    raise self.fail(sink_reset if conduit.failed_side else source_reset) from None
                left -= taken
                written = count - left - conduit.pending
                if taken:
                    self.touch()
                if conduit.pending:
                    await trio.lowlevel.wait_writable(sink)
                elif left and not conduit.eof:
                    await self._wait_for_a_batch(source, left, up)
                else:
                    break
        finally:
            # Counted even when the splice is cut short (the log line's up= and down=): all but what a move()
            # that raised wrote, which it cannot say.
            self.spliced += written
            self._count(written, up)
            conduit.close()
            if self.batching[up]:
                self.batching[up] = 0
                with contextlib.suppress(OSError):  # a socket already failed has no reads left anyway
                    source.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        passed(receiving, count - left)
        self.read_size[up] = AFTER_PASS_READ
        if conduit.eof:
            self.check_end(b"")
            receiving.receive_data(b"")
        else:
            await self._write(sink, after, sink_reset, up)
        return True

    async def _wait_for_a_batch(self, source, left: int, up: bool) -> None:
        """Wait until ``source`` holds a batch of the body (BATCH bytes, or all that is left), or
        BATCH_WAIT went by: a body forwarded by squid comes in small pieces (one splice per 36 KiB,
        against 230 KiB in a tunnel), and moving each as it came cost a wakeup and a splice pair
        per piece. A splice takes what there is."""
        wanted = min(BATCH, left)
        if wanted != self.batching[up]:
            source.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            self.batching[up] = wanted
        with trio.move_on_after(BATCH_WAIT):
            await trio.lowlevel.wait_readable(source)

    def _next_read(self, up: bool) -> int:
        size, self.read_size[up] = self.read_size[up], READ_SIZE
        return size

    async def _write(self, sink, data: bytes, sink_reset: str, up: bool) -> None:
        if data:
            try:
                await send(sink, data)
            except OSError:
                raise self.fail(sink_reset) from None
            self._count(len(data), up)

    def _count(self, sent: int, up: bool) -> None:
        if up:
            self.sent_up += sent
        else:
            self.sent_down += sent

    async def to_client(self, event):
        await self._write(self.client, self.from_client.send(event), ends.CLIENT_RESET, up=False)

    async def to_upstream(self, event):
        await self._write(self.proxy, self.to_proxy.send(event), ends.UPSTREAM_RESET, up=True)

    def target_authority(self, request: h11.Request) -> bytes:
        host = None
        for name, value in request.headers:
            if name == b"host":
                host = self.usable_name(hostname_from_authority(value.decode("ascii", "replace")))
        return authority(host or self.dst[0], self.dst[1])

    async def run(self) -> str:
        """Forward requests until the client is done; returns how it ended (for the log line)."""
        self.touch()
        try:
            with self.idle:
                ended = await self._exchanges()
                self._leave_proxy()
                return ended
            raise ForwardFailed(ends.IDLE_TIMEOUT)
        except BaseException as exc:
            if self.proxy is not None:
                reset(self.proxy)  # the proxy must not see an end of data: its request is not complete
                self.proxy = None
            if isinstance(exc, ForwardFailed) and exc.ended == ends.CLIENT_PROTOCOL_ERROR:
                await self._refuse()
            raise
        finally:
            if self.proxy is not None:
                self.proxy.close()

    def _hand_over_proxy(self) -> tuple[object, bytes]:
        """The proxy's connection as the pump takes it, and what of its bytes was decrypted already."""
        proxy, self.proxy = self.proxy, None
        if isinstance(proxy, TlsProxy):
            return proxy.sock, proxy.plaintext
        return proxy, b""

    def _leave_proxy(self) -> None:
        """The client is done: a proxy connection idle between two exchanges goes to the next client."""
        if (
            self.proxy is not None
            and self.keep_proxy is not None
            and not self.switched
            and self.to_proxy.states == {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}
            and self.keep_proxy(self.proxy)
        ):
            self.proxy = self.to_proxy = None

    async def _refuse(self) -> None:
        """End a client that broke the protocol as squid does: a 400 (unless the response to its request
        is complete), then a FIN, not a reset, so that every complete response before it arrives. A
        response begun and cut short is reset, as ever."""
        if self.from_client.our_state is h11.SEND_BODY:  # a response cut short must not end as if complete
            raise ForwardFailed(ends.CLIENT_PROTOCOL_ERROR)
        told = False
        with trio.move_on_after(LINGER_SECONDS):
            try:
                if self.from_client.our_state is not h11.DONE:  # no final response head sent
                    await write_all(self.client, bad_request(self.refusal))
                self.client.shutdown(trio.socket.SHUT_WR)
                told = True
                dropped = 0
                while dropped < LINGER_BYTES and (data := await self.client.recv(READ_SIZE)):
                    dropped += len(data)
            except OSError:
                raise ForwardFailed(ends.CLIENT_RESET) from None
        # A client that did not take the answer in time is reset; one that did is closed with a FIN.
        raise ForwardFailed(ends.CLIENT_PROTOCOL_ERROR, clean=told)

    async def _exchanges(self) -> str:
        while True:
            try:
                request = await self.client_event()
            except h11.RemoteProtocolError as exc:
                if self.unparsed is not None:
                    raise NeedsTunnel(bytes(self.unparsed)) from None
                raise self.fail(ends.CLIENT_PROTOCOL_ERROR, exc.error_status_hint) from None
            if isinstance(request, h11.ConnectionClosed):
                return ends.CLOSED
            upgrade = self.forward_upgrades and forwardable_upgrade(request)
            if needs_tunnel(request) and not upgrade:
                if self.unparsed is not None:
                    raise NeedsTunnel(bytes(self.unparsed))
                raise ForwardFailed(ends.CLIENT_UPGRADE_AFTER_REQUESTS)  # cannot switch to a tunnel mid-connection
            self.unparsed = None
            await self._exchange(request, upgrade)
            if self.switched:
                proxy, decrypted = self._hand_over_proxy()
                raise Switched(proxy, self.from_client.trailing_data[0], self.to_proxy.trailing_data[0] + decrypted)
            if not self._next_cycle():
                return ends.CLOSED

    async def _exchange(self, request: h11.Request, upgrade: bool) -> None:
        reused = self.to_proxy is not None and self.to_proxy.our_state is h11.IDLE and not proxy_closed(self.proxy)
        if not reused:
            reused = await self._reconnect()
        self.requests += 1
        forwarded = absolute_form(request, self.target_authority(request), self.proxy_authorization, upgrade)
        answered_before = self.sent_down
        try:
            await self._send_and_answer(forwarded)
        except ForwardFailed as exc:
            if not (
                reused
                and exc.ended in CROSSED_CLOSE
                and not self.answering
                and self.sent_down == answered_before
                and replayable(request)
            ):
                raise
            self.failing = None
            if self.from_client.their_state is h11.SEND_BODY:
                await self.client_event()  # the end of a request without a body: no I/O
            await self._reconnect(fresh=True)
            await self._send_and_answer(forwarded, body_read=True)

    async def _send_and_answer(self, request: h11.Request, body_read: bool = False) -> None:
        """Send the request, stream its body (unless already read: a replay has none) and the response."""
        self.answering = False
        await self.to_upstream(request)
        if body_read:
            await self.to_upstream(h11.EndOfMessage())
        failed = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rest_of_request, body_read)
                await self._response()
                # An early final response (e.g. 413) ends the exchange; the rest of the body is not wanted.
                nursery.cancel_scope.cancel()
        except* ForwardFailed:
            failed = True
        if failed:
            # Server.forward expects ForwardFailed itself, not a group: raised here, not in the except* clause,
            # where Python before 3.11.4 (bookworm's 3.11.2) would wrap it in one.
            raise ForwardFailed(self.failing)

    async def _reconnect(self, fresh: bool = False) -> bool:
        """A new proxy connection (``fresh``: never one another client used); whether it served one."""
        if self.proxy is not None:
            self.proxy.close()
        self.proxy, served = await self.open_proxy(fresh)
        self.to_proxy = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        return served

    async def _rest_of_request(self, body_read: bool) -> None:
        """The request's body (unless read already), then a watch on the client until the response is complete."""
        if not body_read:
            await self._request_body()
        await self._watch_client()

    async def _watch_client(self) -> None:
        """A client that leaves ends the exchange at once, as a proxy ends a request its own client
        left (squid: half_closed_clients off), not when the proxy next sends. Bytes of a next
        request mean it is still there: they wait their turn, unread."""
        try:
            if await self.client.recv(1, trio.socket.MSG_PEEK):
                return
        except OSError:
            raise self.fail(ends.CLIENT_RESET) from None
        raise self.fail(ends.CLIENT_CLOSED_MID_REQUEST)

    async def _request_body(self) -> None:
        while True:
            try:
                event = await self.client_event()
            except h11.RemoteProtocolError as exc:  # e.g. an end of data before the body is complete
                raise self.fail(ends.CLIENT_PROTOCOL_ERROR, exc.error_status_hint) from None
            if isinstance(event, h11.ConnectionClosed):
                raise self.fail(ends.CLIENT_CLOSED_MID_REQUEST)
            await self.to_upstream(event)
            if isinstance(event, h11.EndOfMessage):
                return

    async def _response(self) -> None:
        informational = 0
        old_client = self.from_client.their_http_version == b"1.0"
        while True:
            try:
                event = await self.proxy_event()
            except h11.RemoteProtocolError:
                raise self.fail(ends.PROXY_PROTOCOL_ERROR) from None
            if isinstance(event, h11.ConnectionClosed):
                raise self.fail(ends.PROXY_CLOSED)
            if isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > MAX_INFORMATIONAL:  # a proxy sending them without end
                    raise self.fail(ends.PROXY_PROTOCOL_ERROR)
                if old_client:  # RFC 9110 15.2: it may not know what a 1xx is
                    continue
            if isinstance(event, (h11.InformationalResponse, h11.Response)):
                event = forwarded_response(event)
            elif isinstance(event, h11.EndOfMessage) and old_client:
                event = h11.EndOfMessage()  # its response ends with the close: no room for trailers
            await self.to_client(event)
            if isinstance(event, h11.EndOfMessage):
                return
            if self.to_proxy.their_state is h11.SWITCHED_PROTOCOL:  # a 101 to the upgrade we forwarded
                self.switched = True
                return

    def _next_cycle(self) -> bool:
        """Ready both sides for the next request; False if the client connection must end."""
        done = self.to_proxy.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}
        # Bytes after the response, read with it, that nobody asked for: they would answer the next request.
        if not done or self.to_proxy.trailing_data != (b"", False):
            self.proxy.close()
            self.proxy = self.to_proxy = None
        else:
            self.to_proxy.start_next_cycle()
        if self.from_client.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            return False
        self._next_request(*self.from_client.trailing_data)
        return True


async def send(sock, data: bytes) -> None:
    """All of ``data`` to the client or the proxy: a plain socket, or TLS to an https:// proxy."""
    if isinstance(sock, TlsProxy):
        await sock.send_all(data)
    else:
        await write_all(sock, data)


def proxy_closed(proxy) -> bool:
    return proxy.idle_closed() if isinstance(proxy, TlsProxy) else closed_by_peer(proxy)


async def open_tls(sock, upstream, timeout: float) -> TlsProxy:
    """TLS to an https:// proxy on a new connection; raises UpstreamError (the socket then reset)."""
    try:
        return TlsProxy(await secured(sock, upstream, trio.current_time() + timeout))
    except trio.TooSlowError:
        error = handshake_timed_out(timeout)
    except OSError as exc:
        error = handshake_failure(exc)
    except UpstreamError as exc:
        error = exc
    reset(sock)
    raise error


def replayable(request: h11.Request) -> bool:
    """Safe to send again after the proxy dropped it unanswered: idempotent, and no body."""
    if request.method not in IDEMPOTENT:
        return False
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return False
    return True


async def forward(
    client, first: bytes, record, config: Config, pool, candidates, preconnect=None
) -> tuple[str, str | None, bool]:
    """Forward a client's plain HTTP through the first healthy HTTP proxy among ``candidates``
    (the next one if it cannot be reached), on a connection ``preconnect`` opened ahead where it
    has one; (how it ended, the error, whether cleanly).

    ``record`` (the connection) gets the proxy used and the counts; NeedsTunnel
    passes through (the connection then opens a tunnel instead), and so does Switched
    (the connection hands both sockets to the pump)."""
    http_candidates = [state for state in candidates if state.upstream.protocol == "http"]
    # A response's head and body go out in separate writes (as h11 yields them). Under Nagle the
    # body waited for the ACK of the head, which the client delays by 40 ms: every short response
    # took 40 ms more than through squid used directly (apt's 404s, issue 20).
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    used = []  # the upstream state of the proxy connection in use

    async def open_proxy(fresh: bool):
        last = None
        for state in http_candidates:
            used[:] = [state]
            where = (state.upstream, *state.addresses[0], config.mark)
            kept = None if fresh or preconnect is None else preconnect.take_kept(*where)
            if kept is not None:
                record.via = state.upstream
                return adopted(kept), True
            lent = preconnect.take(*where) if preconnect else None
            if lent is not None:
                record.via = state.upstream
                return adopted(lent[0]), False
            try:
                sock = await connect(state.addresses, mark=config.mark, timeout=config.connect_timeout)
                if state.upstream.scheme == "https":
                    sock = await open_tls(sock, state.upstream, config.handshake_timeout)
            except UpstreamError as exc:
                pool.failed(state, exc)
                last = exc
                continue
            pool.succeeded(state)
            record.via = state.upstream
            return sock, False
        raise last

    def keep_proxy(sock) -> bool:
        if preconnect is None or not used:
            return False
        state = used[0]
        if isinstance(sock, TlsProxy):
            if sock.plaintext:  # bytes nobody asked for: not reusable
                return False
            stdlib = sock.sock
        else:
            stdlib = socket.socket(fileno=sock.detach())
        if preconnect.keep(state.upstream, *state.addresses[0], config.mark, stdlib):
            return True
        stdlib.close()
        return True  # closed here: the forwarder has nothing left to close

    upstream = http_candidates[0].upstream
    password = upstream.password.reveal() if upstream.password else None
    forwarder = HttpForwarder(
        client,
        first,
        record.dst,
        open_proxy,
        usable_name=record.usable_name,
        proxy_authorization=basic_credentials(upstream.username, password) if password is not None else None,
        idle_timeout=config.idle_timeout,
        forward_upgrades=config.http_upgrade == "forward",
        keep_proxy=keep_proxy,
        pipe_size=config.pipe_size,
    )
    record.via = upstream
    ended, detail, clean = ends.CLOSED, None, True
    try:
        ended = await forwarder.run()
    except ForwardFailed as exc:
        ended, clean = exc.ended, exc.clean
    except UpstreamError as exc:
        ended, detail, clean = f"refused:{exc.reason}", str(exc), False
    except Switched:
        count(record, forwarder)  # the pump counts on from here
        raise
    count(record, forwarder)
    return ended, detail, clean


def adopted(sock: socket.socket):
    """A pooled connection for the forwarder: TLS ones (their handshake done ahead) as they are."""
    return TlsProxy(sock) if hasattr(sock, "session") else trio.socket.from_stdlib_socket(sock)


def count(record, forwarder: HttpForwarder) -> None:
    record.up, record.down, record.http_requests = forwarder.sent_up, forwarder.sent_down, forwarder.requests
    record.http_spliced = forwarder.spliced
