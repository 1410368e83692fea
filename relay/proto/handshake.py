"""What every proxy handshake shares: target checks and the sans-IO state machine shell.

A handshake queues bytes for the proxy in ``data_to_send()``, takes whatever
was read from it in ``receive_data()``, in any fragmentation, and turns
``established`` once the tunnel is open; bytes that arrived after the proxy's
final reply are the start of the tunnel, in ``trailing_data``.
"""

import functools
import ipaddress

from relay.addresses import format_address
from relay.proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

MAX_HOSTNAME_SIZE = 255

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def validate_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LocalProtocolError(f"port must be an integer in 1..65535, got {port!r}")


@functools.lru_cache(maxsize=4096)  # per connection, and most go to hosts seen before; bounded
def parse_ip_literal(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal, None when it is a hostname."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # The zone names one of *our* interfaces; it means nothing to the proxy.
        raise LocalProtocolError(f"cannot send the scoped IPv6 address {host!r} to a proxy")
    return address


def encode_hostname(host: str) -> bytes:
    """``host`` as ASCII, checked against what no proxy protocol can carry."""
    try:
        encoded = host.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"hostname {host!r} is not ASCII (IDNA-encode it first)") from None
    if not 1 <= len(encoded) <= MAX_HOSTNAME_SIZE:
        raise LocalProtocolError(f"hostname must be 1..{MAX_HOSTNAME_SIZE} bytes, got {len(encoded)}")
    return encoded


class Handshake:
    """The client side of one proxy handshake, without the protocol.

    Subclasses queue their first message in ``__init__`` and implement
    ``_receive()``, which parses the proxy's replies and calls ``_establish()``
    on success. Any ``ProtocolError`` kills the machine: every later call raises
    it again, so a caller cannot go on with a half-done handshake.
    """

    # Set by each protocol, formatted with ``target``: the error when the proxy
    # hangs up before success.
    _CLOSED_EARLY_MESSAGE: str

    def __init__(self, host: str, port: int) -> None:
        validate_port(port)
        self._target = format_address((host, port))
        self._outgoing = bytearray()
        self._trailing = bytearray()
        self._established = False
        self._error: ProtocolError | None = None

    @property
    def established(self) -> bool:
        return self._established

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._trailing)

    def data_to_send(self) -> bytes:
        self._raise_if_failed()
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the proxy; ``b""`` means it closed the connection."""
        self._raise_if_failed()
        if self._established:
            self._trailing += data
            return
        try:
            if not data:
                raise RemoteProtocolError(self._CLOSED_EARLY_MESSAGE.format(target=self._target))
            self._receive(data)
        except ProtocolError as exc:
            self._error = exc
            raise

    def _receive(self, data: bytes) -> None:
        """Parse ``data``, which is never empty and arrives before success."""
        raise NotImplementedError

    def _establish(self, tunnel_data: bytes) -> None:
        """Open the tunnel; ``tunnel_data`` followed the proxy's success reply."""
        self._established = True
        self._trailing += tunnel_data

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __repr__(self) -> str:
        if self._error is not None:
            state = "failed"
        elif self._established:
            state = "established"
        else:
            state = "handshaking"
        return f"<{type(self).__name__} target={self._target!r} {state}>"
