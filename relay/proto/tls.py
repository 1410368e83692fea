"""TLS to a proxy (``https://`` upstreams), the parts without OpenSSL or sockets.

The TLS itself is relay.net.tls.TlsSession, OpenSSL on memory BIOs (no
socket either, but this package imports no I/O library, ssl included): the
caller hands it what it read from the proxy's socket (``receive``), and writes
out what it queues (``data_to_send``); in between, ``decrypt`` gives the
plaintext and ``encrypt`` queues records.

``TlsHandshake`` wraps a proxy handshake machine (relay.proto.http_connect) in
it, with the machines' interface (``data_to_send``, ``receive_data``,
``established``, ``trailing_data``), so the Dialer drives a CONNECT over TLS
as it drives one over TCP; once established, ``session`` carries on.

How the proxy's side ends (``TlsSession.end_of_stream`` after the socket's
FIN) is told apart, because only some ends mean the data is complete:

- ``close_notify``: TLS's own end, authenticated: a clean end (a FIN onwards);
- a TCP FIN on a record boundary without close_notify: what many servers do
  (and any middlebox could forge); passed on as a FIN, as for a plain proxy;
- a FIN in the middle of a record (``TRUNCATED``), or an alert or a record
  that does not decrypt (``TlsFailure``): the data is damaged: the client is reset.
"""

from relay.proto.errors import RemoteProtocolError

RECORD_HEADER = 5  # type, version (2), length (2)
CLOSE_NOTIFY = "close-notify"
BARE_FIN = "bare-fin"
TRUNCATED = "truncated"


class TlsFailure(RemoteProtocolError):
    """The TLS connection to the proxy failed: ``reason`` is one short word for logs and metrics
    (``tls-certificate``, ``tls-alert``, ``tls-not-tls``, ``tls-error``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class RecordBoundary:
    """Where the proxy's ciphertext stands between TLS records: whether a FIN came in the middle of one.

    Only the 5-byte headers are looked at (once per record, up to 16 KB each), never the bodies."""

    __slots__ = ("left", "header")

    def __init__(self) -> None:
        self.left = 0  # bytes of the current record's body still to come
        self.header = b""  # the start of a header split across reads

    def feed(self, data) -> None:
        position, size = 0, len(data)
        while True:
            if self.left:
                step = min(self.left, size - position)
                self.left -= step
                position += step
                if self.left:
                    return
            if position >= size:
                return
            need = RECORD_HEADER - len(self.header)
            self.header += bytes(data[position : position + need])
            position += need
            if len(self.header) < RECORD_HEADER:
                return
            self.left = int.from_bytes(self.header[3:5], "big")
            self.header = b""

    @property
    def between_records(self) -> bool:
        return not self.left and not self.header


class TlsHandshake:
    """The TLS handshake with the proxy, then ``inner`` (a proxy handshake machine) inside it."""

    def __init__(self, session, inner):
        self.session = session  # a fresh relay.net.tls.TlsSession: OpenSSL on memory BIOs
        self.inner = inner
        self.secure = False  # the TLS handshake is done
        self.established = False
        self.trailing_data = b""
        self._step()

    def adopt(self, session) -> None:
        """Go on with ``session``, whose handshake was done ahead (a pre-opened connection's)."""
        self.session, self.secure = session, True
        session.encrypt(self.inner.data_to_send())

    def __getattr__(self, name):  # e.g. pipelining_unconfirmed: the inner machine's
        return getattr(self.inner, name)

    def _step(self) -> None:
        session = self.session
        if not self.secure:
            self.secure = session.handshake()
            if not self.secure:
                return
            session.encrypt(self.inner.data_to_send())
        plaintext = session.decrypt()
        if session.closed_by_peer and not self.inner.established:
            raise TlsFailure("the proxy ended TLS (close_notify) during the handshake", "tls-closed")
        if plaintext:
            self.inner.receive_data(plaintext)
            more = self.inner.data_to_send()
            if more:
                session.encrypt(more)
        if self.inner.established:
            self.established = True
            self.trailing_data = self.inner.trailing_data

    def receive_data(self, data: bytes) -> None:
        self.session.receive(data)
        self._step()

    def data_to_send(self) -> bytes:
        return self.session.data_to_send()
