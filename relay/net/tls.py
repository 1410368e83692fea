"""https:// upstreams: the client TLS context, the TLS session (OpenSSL on memory BIOs, no socket:
``TlsSession``), and, with Trio, relaying a connection whose upstream side is TLS (``TlsRelay``), plain
HTTP forwarded inside TLS (``TlsProxy``) and the relay's own tunnels (``TlsStream``). relay.proto.tls
holds what needs no OpenSSL: the proxy handshake inside TLS, and where records end.

This kernel has no ``tls`` ULP (kernel TLS), so the proxy's side cannot be
spliced: its bytes pass through this process once each way, decrypted or
encrypted by OpenSSL in large batches (``TLS_READ`` per read of the socket,
16 KB records), with Python running per batch and per record, never per
byte. Such a connection is relayed by a task of its own (``TlsRelay``)
instead of a row in the fast-path engine; it ends as the engine's do:

- the client's FIN becomes our close_notify (TLS 1.3 lets the proxy go on
  sending: a half-close), its reset a reset of the proxy's socket;
- the proxy's close_notify, or a bare FIN on a record boundary, becomes a FIN
  to the client (the bare FIN is held for --confirm-eof's probe, close_notify
  is the proxy's own authenticated end and needs none);
- a reset, an alert, a record that does not decrypt or a FIN in the middle of a
  record resets the client (``upstream-reset``, ``upstream-tls-error``,
  ``upstream-tls-truncated``);
- idle and half-closed timeouts as in the engine.

With kernel TLS, the session's keys would go to the socket after the handshake
(TCP_ULP "tls", TLS_TX/TLS_RX) and the socket would go to the engine as any
other: see README, "Proxies over TLS".
"""

import functools
import os
import socket
import ssl

import trio

from relay import ends
from relay.config import ConfigError, TlsOptions, Upstream
from relay.logs import log
from relay.net.faults import closed_in_tls_handshake, handshake_failure
from relay.net.sockets import receive_some, reset, write_all
from relay.proto.tls import BARE_FIN, CLOSE_NOTIFY, TRUNCATED, RecordBoundary, TlsFailure

RECV_SIZE = 16384  # handshake reads
# Read from either socket at once, and the plaintext buffer of a relayed connection: larger reads cost
# more than they save (allocations past malloc's mmap threshold, page faults).
TLS_READ = 1 << 16
TURN_BYTES = 1 << 20  # a busy connection lets other tasks run at least this often (see TlsRelay.take_turns)
_SCRATCH = memoryview(bytearray(TLS_READ))  # TlsSession.decrypt's, for the bytes it copies out


def failure(exc: ssl.SSLError, where: str) -> TlsFailure:
    """The TlsFailure for what OpenSSL raised ``where`` (``handshake``, ``data``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsFailure(f"TLS {where} with the proxy: certificate refused: {exc.verify_message}", "tls-certificate")
    reason = (exc.reason or "").lower()
    if "wrong_version_number" in reason or "record_layer_failure" in reason or "packet_length_too_long" in reason:
        return TlsFailure(f"TLS {where} with the proxy: the proxy does not speak TLS ({exc.reason})", "tls-not-tls")
    if reason.startswith(("sslv3_alert", "tlsv1_alert", "tlsv13_alert")):
        return TlsFailure(f"TLS {where} with the proxy: the proxy sent an alert ({exc.reason})", "tls-alert")
    return TlsFailure(f"TLS {where} with the proxy failed: {exc.reason or exc}", "tls-error")


class TlsSession:
    """One TLS client connection on OpenSSL's memory BIOs, sans-IO (relay.proto.tls says how it is used).

    With memory BIOs one read of the socket (hundreds of KB) feeds many records, and one write sends
    them all: Python runs per read and per 16 KB record, never per byte, and there are no small reads
    of record headers as with a socket BIO."""

    __slots__ = ("tls", "incoming", "outgoing", "boundary", "closed_by_peer", "closing")

    def __init__(self, context: ssl.SSLContext, server_hostname: str):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=server_hostname)
        self.boundary = RecordBoundary()
        self.closed_by_peer = False  # close_notify came
        self.closing = False  # ours went

    def handshake(self) -> bool:
        """Drive the handshake with what was received: True once done; raises TlsFailure."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise failure(exc, "handshake") from None
        return True

    def receive(self, data) -> None:
        """Ciphertext read from the proxy's socket."""
        self.boundary.feed(data)
        self.incoming.write(data)

    def decrypt(self) -> bytes:
        """Every byte of plaintext the received records hold; b"" when none (yet). After
        close_notify ``closed_by_peer`` is set. Raises TlsFailure on an alert or a bad record."""
        chunks = []
        while True:  # nothing yields in between: the shared scratch buffer is this call's
            count = self.decrypt_into(_SCRATCH)
            chunks.append(bytes(_SCRATCH[:count]))
            if count < len(_SCRATCH):
                return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def decrypt_into(self, view: memoryview) -> int:
        """Fill ``view`` with the plaintext the received records hold, without a bytes object per record:
        how much (0: none yet, or close_notify came). Call again while it fills ``view`` whole."""
        tls, size, done = self.tls, len(view), 0
        try:
            while done < size:
                count = tls.read(size - done, view[done:])
                if not count:
                    self.closed_by_peer = True  # Python's read gives 0 for close_notify
                    break
                done += count
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed_by_peer = True
        except ssl.SSLError as exc:
            raise failure(exc, "data") from None
        return done

    def encrypt(self, data) -> None:
        """Queue ``data`` as records (OpenSSL cuts them at 16 KB) for ``data_to_send``."""
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            raise failure(exc, "data") from None

    def close(self) -> None:
        """Queue our close_notify: our end of the data, the other direction may go on (TLS 1.3)."""
        if self.closing:
            return
        self.closing = True
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent, the peer's not here yet: as wanted
        except ssl.SSLError as exc:
            raise failure(exc, "close") from None

    def data_to_send(self) -> bytes:
        return self.outgoing.read()

    def end_of_stream(self) -> str:
        """How the proxy's side ended, now that its socket read a FIN: CLOSE_NOTIFY, BARE_FIN or TRUNCATED."""
        if self.closed_by_peer:
            return CLOSE_NOTIFY
        return BARE_FIN if self.boundary.between_records else TRUNCATED

    @property
    def version(self) -> str | None:
        return self.tls.version()


def client_context(options: TlsOptions) -> ssl.SSLContext:
    """The SSLContext for https:// upstreams with ``options``; ConfigError if its files cannot be used.
    Built again when one of its files changed (a renewed certificate needs no restart)."""
    stamps = tuple(_modified(path) for path in (options.ca, options.cert, options.key))
    return _context(options, stamps)


def _modified(path: str | None) -> float | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _context(options: TlsOptions, stamps) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=options.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if options.cert is not None:
            context.load_cert_chain(options.cert, options.key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        which = "--upstream-ca" if options.cert is None else "--upstream-ca, --upstream-cert or --upstream-key"
        raise ConfigError(f"{which}: cannot load: {getattr(exc, 'strerror', None) or exc}") from None
    return context


def check_contexts(upstreams: list[Upstream]) -> None:
    """Load every https:// upstream's certificates now, so a bad file stops the start; raises ConfigError."""
    for upstream in upstreams:
        if upstream.scheme == "https":
            client_context(upstream.tls or TlsOptions())


async def secured(sock: socket.socket, upstream: Upstream, deadline: float) -> "TlsSocket":
    """The TLS handshake on a connected socket, ahead of a client (relay.net.preconnect): it then saves the
    handshake's round trip too. Raises UpstreamError, OSError, or TooSlowError past ``deadline``."""
    session = TlsSession(client_context(upstream.tls or TlsOptions()), upstream.server_name)
    with trio.fail_at(deadline):
        while True:
            try:
                done = session.handshake()
            except TlsFailure as exc:
                raise handshake_failure(exc) from None
            await write_all(sock, session.data_to_send())
            if done:
                return TlsSocket.adopt(sock, session)
            data = await receive_some(sock, RECV_SIZE)
            if not data:
                raise closed_in_tls_handshake()
            session.receive(data)


def closed_while_idle(sock: "TlsSocket") -> bool:
    """Whether an idle pre-opened TLS connection was ended by the proxy. It reads what came instead of
    peeking: a TLS 1.3 server sends its session tickets after the handshake, and only a close, an alert
    or data nobody asked for mean it is not usable."""
    session = sock.session
    try:
        data = sock.recv(RECV_SIZE)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if not data:
        return True
    session.receive(data)
    try:
        return bool(session.decrypt()) or session.closed_by_peer
    except TlsFailure:
        return True


async def readable(fd: int) -> bool:
    """Wait until ``fd`` is readable: False if the connection ended (and closed it) meanwhile."""
    try:
        await trio.lowlevel.wait_readable(fd)
    except trio.ClosedResourceError:
        return False
    return True


class TlsSocket(socket.socket):
    """A connected socket to an https:// proxy with its TLS session: from the Dialer, the tunnel open (the
    proxy said 2xx); from the Preconnector, the TLS handshake done and nothing asked yet."""

    __slots__ = ("session",)

    @classmethod
    def adopt(cls, sock: socket.socket, session: TlsSession) -> "TlsSocket":
        family, kind, proto = sock.family, sock.type, sock.proto
        adopted = cls(family, kind, proto, fileno=sock.detach())
        adopted.setblocking(False)  # a socket made from an fd takes the default timeout's blocking mode
        adopted.session = session
        return adopted


class TlsRelay:
    """One connection whose upstream side is TLS, relayed by its own task (see the module docstring).
    ``on_finished(token, ended, sent_up, sent_down)`` is called once."""

    __slots__ = (
        "client", "upstream", "session", "token", "on_finished", "idle_timeout", "half_closed_timeout",
        "to_upstream_first", "to_client_first", "confirm_eof", "up", "down", "ended", "done", "scope", "lock",
        "since_turn",
    )  # fmt: skip

    def __init__(self, client, upstream: TlsSocket, token, on_finished, *, idle_timeout, half_closed_timeout,
                 to_upstream_first=b"", to_client_first=b"", confirm_eof=None):  # fmt: skip
        self.client, self.upstream, self.session = client, upstream, upstream.session
        client.setblocking(False)
        self.token, self.on_finished = token, on_finished
        self.idle_timeout, self.half_closed_timeout = idle_timeout, half_closed_timeout
        self.to_upstream_first, self.to_client_first = to_upstream_first, to_client_first
        self.confirm_eof = confirm_eof
        self.up = self.down = 0
        self.ended: str | None = None  # set once: how it ended
        self.done = 0  # directions finished cleanly
        self.scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
        self.lock = trio.Lock()  # one writer of the proxy's socket at a time: records go out in order
        self.since_turn = 0  # bytes moved since this connection last let other tasks run

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.downstream)
                    nursery.start_soon(self.upstream_side)
            if self.ended is None:
                if self.done == 2:
                    self.finish(ends.CLOSED)
                else:  # the deadline: nothing moved for the timeout
                    self.finish(ends.HALF_CLOSED_TIMEOUT if self.done else ends.IDLE_TIMEOUT)
        finally:
            self.finish(ends.CANCELLED)  # nothing if it ended already

    def moved(self) -> None:
        self.scope.deadline = trio.current_time() + (self.half_closed_timeout if self.done else self.idle_timeout)

    async def take_turns(self, moved: int) -> None:
        """A direction whose reads never wait would never let another task run: it yields once per
        TURN_BYTES it moved (a scheduler pass per 64 KB read cost more than the TLS of it)."""
        self.since_turn += moved
        if self.since_turn >= TURN_BYTES:
            self.since_turn = 0
            await trio.lowlevel.checkpoint()

    def finish(self, ended: str) -> None:
        """End it (once): a clean end closes both sockets, any other resets them."""
        if self.ended is not None:
            return
        self.ended = ended
        for sock in (self.client, self.upstream):
            # Wakes this connection's waits (ClosedResourceError) before the fd number can be reused.
            trio.lowlevel.notify_closing(sock.fileno())
            if ended == ends.CLOSED:
                sock.close()
            else:
                reset(sock)
        self.scope.cancel()
        try:
            self.on_finished(self.token, ended, self.up, self.down)
        except Exception:  # a bug must cost one connection's bookkeeping
            log.exception("internal error after relaying a connection")

    def direction_done(self) -> None:
        self.done += 1
        if self.done == 2:
            self.scope.cancel()
        else:
            self.moved()

    async def flush(self) -> bool:
        """Send what the session queued for the proxy; False (and the end) if the proxy's socket failed.
        Without a pass through Trio's scheduler when there is nothing to send or no one else sending."""
        if not self.session.outgoing.pending:
            return True
        if self.lock.locked():
            await self.lock.acquire()  # the other direction is writing records queued before ours
        else:
            self.lock.acquire_nowait()
        try:
            await write_all(self.upstream, self.session.data_to_send())
        except OSError:
            self.finish(ends.UPSTREAM_RESET)
            return False
        except trio.ClosedResourceError:  # ended meanwhile
            return False
        finally:
            self.lock.release()
        return True

    async def to_client(self, data: bytes) -> bool:
        try:
            await write_all(self.client, data)
        except OSError:
            self.finish(ends.CLIENT_RESET)
            return False
        except trio.ClosedResourceError:
            return False
        self.down += len(data)
        self.moved()
        return True

    async def downstream(self) -> None:
        """The proxy's records, decrypted, to the client."""
        session, fd = self.session, self.upstream.fileno()
        if self.to_client_first and not await self.to_client(self.to_client_first):
            return
        view = memoryview(bytearray(TLS_READ))
        while not session.closed_by_peer:
            data = await self.read(fd, ends.UPSTREAM_RESET)
            if data is None:
                return
            if not data:
                how = session.end_of_stream()
                if how == TRUNCATED:
                    self.finish(ends.UPSTREAM_TLS_TRUNCATED)
                    return
                if how == BARE_FIN and self.confirm_eof is not None and not await self.confirmed():
                    self.finish(ends.UPSTREAM_DOWN)
                    return
                break
            session.receive(data)
            while True:  # the plaintext through one buffer, without a bytes object per record
                try:
                    count = session.decrypt_into(view)
                except TlsFailure as exc:
                    log.debug("upstream TLS failed: %s", exc)
                    self.finish(ends.UPSTREAM_TLS_ERROR)
                    return
                if count and not await self.to_client(view[:count]):
                    return
                if count < len(view):
                    break
            if not await self.flush():  # what reading queued: a TLS 1.3 key update's answer
                return
            await self.take_turns(len(data))
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish(ends.CLIENT_RESET)
            return
        self.direction_done()

    async def read(self, fd: int, reset_word: str) -> bytes | None:
        """What came on ``fd`` (b"": a FIN), waiting for it; None once the connection ended (``reset_word``
        if this read found the socket reset)."""
        while True:
            try:
                return os.read(fd, TLS_READ)
            except BlockingIOError:
                if not await readable(fd):
                    return None
            except OSError:
                self.finish(reset_word)
                return None

    async def confirmed(self) -> bool:
        try:
            return await self.confirm_eof()
        except Exception:  # a bug must not take the connection down: let the FIN through
            log.exception("internal error while probing an upstream")
            return True

    async def upstream_side(self) -> None:
        """The client's bytes, encrypted, to the proxy; its FIN as our close_notify."""
        session, fd = self.session, self.client.fileno()
        first = self.to_upstream_first
        if first:
            session.encrypt(first)
            if not await self.flush():
                return
            self.up += len(first)
        while True:
            data = await self.read(fd, ends.CLIENT_RESET)
            if data is None:
                return
            if not data:
                break
            session.encrypt(data)
            if not await self.flush():
                return
            self.up += len(data)
            self.moved()
            await self.take_turns(len(data))
        try:
            session.close()
        except TlsFailure:
            self.finish(ends.UPSTREAM_TLS_ERROR)
            return
        if await self.flush():
            self.direction_done()


async def tls_stream(sock, upstream: Upstream, timeout: float) -> trio.SSLStream:
    """TLS to the proxy on a connected Trio socket, for one-off exchanges (health checks, --confirm-eof's
    probe); raises UpstreamError (the handshake failed or took more than ``timeout``)."""
    from relay.net.faults import handshake_timed_out

    context = client_context(upstream.tls or TlsOptions())
    stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=upstream.server_name)
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise handshake_timed_out(timeout) from None
    except trio.BrokenResourceError as exc:
        raise handshake_failure(stream_failure(exc)) from None
    return stream


def stream_failure(exc: trio.BrokenResourceError) -> Exception:
    """What broke a trio.SSLStream: a TlsFailure, or the socket's OSError."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return failure(cause, "handshake")
    if isinstance(cause, OSError):
        return cause
    return TlsFailure("the proxy closed the connection during the TLS handshake", "proxy-closed")


class TlsProxy:
    """A connection to an https:// proxy with the few methods of a Trio socket that plain HTTP forwarding
    (relay.net.http_forward) uses: its requests and responses pass through TLS here."""

    __slots__ = ("sock", "session", "plaintext", "ended")

    def __init__(self, sock: TlsSocket):
        self.sock, self.session = sock, sock.session
        self.plaintext = b""  # decrypted, not asked for yet
        self.ended = False  # the proxy's end came (close_notify or a FIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    async def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext, b"" at the proxy's end; ConnectionResetError for a reset,
        an alert, a bad record or a cut one."""
        session = self.session
        while not self.plaintext:
            if self.ended or session.closed_by_peer:
                return b""
            data = await receive_some(self.sock, TLS_READ)
            if not data:
                if session.end_of_stream() == TRUNCATED:
                    raise ConnectionResetError("the proxy's TLS ended in the middle of a record")
                self.ended = True
                return b""
            session.receive(data)
            try:
                self.plaintext = session.decrypt()
            except TlsFailure as exc:
                raise ConnectionResetError(str(exc)) from None
            await self.send_all(b"")  # what reading queued (a key update's answer)
        data, self.plaintext = self.plaintext[:size], self.plaintext[size:]
        return data

    async def send_all(self, data: bytes) -> None:
        if data:
            try:
                self.session.encrypt(data)
            except TlsFailure as exc:
                raise ConnectionResetError(str(exc)) from None
        queued = self.session.data_to_send()
        if queued:
            await write_all(self.sock, queued)

    def shutdown(self, how: int) -> None:
        """Our end of the data: close_notify, sent now (it is small; a full socket buffer drops it)."""
        try:
            self.session.close()
            self.sock.send(self.session.data_to_send())
        except (TlsFailure, BlockingIOError):
            pass
        except OSError as exc:
            raise ConnectionResetError(str(exc)) from None

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def close(self) -> None:
        self.sock.close()

    def idle_closed(self) -> bool:
        """Whether, idle between exchanges, it was closed by the proxy or holds bytes nobody asked for."""
        return bool(self.plaintext) or self.ended or closed_while_idle(self.sock)


class TlsStream(trio.abc.Stream):
    """A tunnel through an https:// proxy as a Trio stream, for the relay's own clients of the tunnel
    (the DNS service's resolvers): what ``trio.SocketStream`` is for the other upstreams."""

    def __init__(self, sock: TlsSocket):
        self.proxy = TlsProxy(sock)
        self.closed = False

    async def send_all(self, data) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        try:
            await self.proxy.send_all(bytes(data))
        except OSError as exc:
            raise trio.BrokenResourceError from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.proxy.sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError
        try:
            return await self.proxy.recv(max_bytes or TLS_READ)
        except OSError as exc:
            raise trio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.proxy.sock)
            self.proxy.close()
        await trio.lowlevel.checkpoint()


def tunnel_stream(sock: socket.socket) -> trio.abc.Stream:
    """An opened tunnel (the Dialer's socket) as a Trio stream: TLS inside for an https:// proxy."""
    if isinstance(sock, TlsSocket):
        return TlsStream(sock)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
