"""DNS over HTTPS (RFC 8484), the client side of one HTTP/2 connection (sans-IO, on h2).

Each query is one POST stream; many streams share the connection, at most as
many at once as the server allows (SETTINGS_MAX_CONCURRENT_STREAMS, and never
more than MAX_STREAMS). Every received DATA byte is acknowledged, so neither
the stream nor the connection window closes. The caller feeds bytes read from
the TLS stream to ``receive_data`` and sends what ``data_to_send`` returns.
"""

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

CONTENT_TYPE = b"application/dns-message"
MAX_STREAMS = 100  # our own bound on queries in flight on one connection
MAX_BODY = 65535  # a DNS message is never larger


@dataclass(frozen=True)
class Answer:
    stream_id: int
    body: bytes


@dataclass(frozen=True)
class Failed:
    stream_id: int
    reason: str  # a short word: "http-503", "content-type", "oversized", "h2-reset", "h2-goaway"...
    message: str


class DohError(Exception):
    """The connection cannot go on (a protocol error, or the server ended it); every stream on it failed."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class DohClient:
    def __init__(self, authority: str, path: str):
        self.authority, self.path = authority.encode(), path.encode()
        # Our own header blocks are fixed and tested: h2 need not check nor rewrite them per query.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.ENABLE_PUSH: 0}
        )
        self._h2.initiate_connection()
        self._streams: dict[int, _Stream] = {}  # the queries in flight
        self.accepting = True  # False once the server sent GOAWAY (or the stream IDs ran out)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def can_start(self) -> bool:
        """A new query may start now (else wait for a stream to end, or open another connection when
        no longer ``accepting``)."""
        limit = min(MAX_STREAMS, self._h2.remote_settings.max_concurrent_streams)
        return self.accepting and len(self._streams) < limit

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def start_query(self, wire: bytes) -> int:
        """Open a stream POSTing ``wire``; its stream ID (the answer or failure will name it)."""
        if not self.can_start():
            raise DohError("no stream available on this connection", "h2-busy")
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.accepting = False
            raise DohError("the connection ran out of stream IDs", "h2-exhausted") from None
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", self.authority),
            (b":path", self.path),
            (b"accept", CONTENT_TYPE),
            (b"content-type", CONTENT_TYPE),
            (b"content-length", str(len(wire)).encode()),
        ]
        self._h2.send_headers(stream_id, headers)
        stream = self._streams[stream_id] = _Stream(wire)
        self._send_body(stream_id, stream)
        return stream_id

    def ping(self) -> None:
        """Ask the server for a PING acknowledgement: proof that the connection still carries bytes."""
        self._h2.ping(b"relaydns")

    def cancel(self, stream_id: int) -> None:
        """The caller no longer waits for this query: reset its stream (RST_STREAM CANCEL)."""
        if self._streams.pop(stream_id, None) is not None:
            self._reset(stream_id)

    def receive_data(self, data: bytes) -> list[Answer | Failed]:
        """Feed bytes from the server; what became of the queries. Raises DohError when the connection
        itself failed: then every query still in flight has failed with it."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise self.connection_lost(f"HTTP/2 protocol error from the server: {exc}", "h2-protocol-error") from None
        outcomes: list[Answer | Failed] = []
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self._response(event.stream_id, event.headers, outcomes)
            elif isinstance(event, h2.events.DataReceived):
                # Acknowledged even for a stream we gave up on: the connection's window is shared.
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._data(event.stream_id, event.data, outcomes)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id, outcomes)
            elif isinstance(event, h2.events.StreamReset):
                self._fail(event.stream_id, "h2-reset", f"the server reset the stream ({event.error_code!r})", outcomes)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for stream_id, stream in list(self._streams.items()):
                    self._send_body(stream_id, stream)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event, outcomes)
        return outcomes

    def connection_lost(self, message: str, reason: str) -> DohError:
        """The connection is gone: every query in flight failed; the error to raise."""
        self.accepting = False
        self._streams.clear()
        return DohError(message, reason)

    # -- one stream -------------------------------------------------------------------

    def _send_body(self, stream_id: int, stream: "_Stream") -> None:
        """As much of the query as the flow-control windows take (all of it, but for a tiny window)."""
        while stream.unsent:
            size = min(
                len(stream.unsent), self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
            )
            if size <= 0:
                return
            chunk, stream.unsent = stream.unsent[:size], stream.unsent[size:]
            self._h2.send_data(stream_id, chunk, end_stream=not stream.unsent)

    def _response(self, stream_id: int, headers, outcomes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        fields = dict(headers)
        status = fields.get(b":status", b"")
        content_type = fields.get(b"content-type", b"").split(b";")[0].strip().lower()
        if status != b"200":
            self._fail(
                stream_id,
                f"http-{status.decode(errors='replace')[:3]}",
                f"the server answered HTTP status {status.decode(errors='replace')[:3]}",
                outcomes,
                reset=True,
            )
        elif content_type != CONTENT_TYPE:
            self._fail(
                stream_id,
                "content-type",
                "the server answered something else than application/dns-message",
                outcomes,
                reset=True,
            )
        else:
            stream.status_ok = True

    def _data(self, stream_id: int, data: bytes, outcomes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream.status_ok:
            self._fail(stream_id, "h2-protocol-error", "DATA before the response headers", outcomes, reset=True)
            return
        stream.body += data
        if len(stream.body) > MAX_BODY:
            self._fail(stream_id, "oversized", f"an answer of more than {MAX_BODY} bytes", outcomes, reset=True)

    def _ended(self, stream_id: int, outcomes) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if not stream.body:
            outcomes.append(Failed(stream_id, "empty", "the server answered with an empty body"))
        else:
            outcomes.append(Answer(stream_id, bytes(stream.body)))

    def _fail(self, stream_id: int, reason: str, message: str, outcomes, reset: bool = False) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        outcomes.append(Failed(stream_id, reason, message))
        if reset:
            self._reset(stream_id)

    def _reset(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:  # StreamClosedError among them
            pass  # it ended meanwhile, or the whole connection did (a GOAWAY read with it): nothing to reset

    def _goaway(self, event: h2.events.ConnectionTerminated, outcomes) -> None:
        """No new streams, and none still open is answered: h2 takes no frame after a GOAWAY."""
        self.accepting = False
        for stream_id in list(self._streams):
            self._fail(stream_id, "h2-goaway", f"the server closed the connection ({event.error_code!r})", outcomes)


class _Stream:
    __slots__ = ("unsent", "body", "status_ok")

    def __init__(self, wire: bytes):
        self.unsent = wire
        self.body = bytearray()
        self.status_ok = False
