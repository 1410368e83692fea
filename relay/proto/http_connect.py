"""Client side of an HTTP CONNECT proxy handshake, on top of h11.

Same interface as the SOCKS clients: ``data_to_send()``, ``receive_data()``,
``established`` and ``trailing_data``.
"""

import base64
import ipaddress

import h11

from relay.proto.errors import (
    LocalProtocolError,
    ProtocolError,
    ProxyRefused,
    RemoteProtocolError,
)

MAX_REPLY_HEAD_SIZE = 16 * 1024
MAX_HOSTNAME_SIZE = 255
MAX_REASON_PHRASE_IN_MESSAGE = 100
# Besides whitespace and controls, these would change the meaning of "host:port".
_AUTHORITY_DELIMITERS = frozenset("/?#@[]:")
_UNREACHABLE_STATUSES = frozenset({502, 503, 504})


def _authority(host: str, port: int) -> str:
    """``host:port`` as it goes in the request target and the Host header."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LocalProtocolError(f"port must be an integer in 1..65535, got {port!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            # The zone names one of *our* interfaces; it means nothing to the proxy.
            raise LocalProtocolError(f"cannot send the scoped IPv6 address {host!r} to a proxy")
        return f"[{host}]:{port}"
    if address is None:
        _validate_hostname(host)
    return f"{host}:{port}"


def _validate_hostname(host: str) -> None:
    if not host.isascii():
        raise LocalProtocolError(f"hostname {host!r} is not ASCII (IDNA-encode it first)")
    if not 1 <= len(host) <= MAX_HOSTNAME_SIZE:
        raise LocalProtocolError(
            f"hostname must be 1..{MAX_HOSTNAME_SIZE} bytes, got {len(host)}"
        )
    if not host.isprintable() or any(c.isspace() or c in _AUTHORITY_DELIMITERS for c in host):
        raise LocalProtocolError(f"hostname {host!r} cannot go in a CONNECT request")


class HttpConnectClient:
    """HTTP/1.1 CONNECT, with Basic proxy authentication when credentials are given."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._authority = _authority(host, port)
        headers = [("Host", self._authority)]
        if (username is None) != (password is None):
            raise LocalProtocolError("username and password must be given together")
        if username is not None:
            if ":" in username:
                raise LocalProtocolError("a Basic auth username cannot contain ':' (RFC 7617)")
            token = base64.b64encode(f"{username}:{password}".encode("utf-8")).decode("ascii")
            headers.append(("Proxy-Authorization", f"Basic {token}"))
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REPLY_HEAD_SIZE)
        request = h11.Request(method="CONNECT", target=self._authority, headers=headers)
        self._outgoing = self._conn.send(request) + self._conn.send(h11.EndOfMessage())
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
        data, self._outgoing = self._outgoing, b""
        return data

    def receive_data(self, data: bytes) -> None:
        self._raise_if_failed()
        if self._established:
            self._trailing += data
            return
        try:
            if not data:
                raise RemoteProtocolError(
                    f"proxy closed the connection before answering CONNECT {self._authority}"
                )
            self._feed(data)
        except h11.RemoteProtocolError as exc:
            self._error = RemoteProtocolError(
                f"malformed reply from the proxy to CONNECT {self._authority}: {exc}"
            )
            raise self._error from exc
        except ProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> None:
        while data:
            # h11 only bounds heads that are still incomplete. Handing it no
            # more than fills one maximal head makes the bound hold for
            # complete heads too, however the bytes were split.
            room = MAX_REPLY_HEAD_SIZE - self._buffered_size()
            self._conn.receive_data(data[:room])
            data = data[room:]
            self._process_events()
            if self._established:
                # A 2xx to CONNECT switches protocols: whatever follows the head
                # is tunnel data, whatever Content-Length said.
                self._trailing += self._conn.trailing_data[0] + data
                return

    def _process_events(self) -> None:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if self._buffered_size() >= MAX_REPLY_HEAD_SIZE:
                    raise RemoteProtocolError(
                        f"proxy reply head to CONNECT {self._authority} "
                        f"exceeds {MAX_REPLY_HEAD_SIZE} bytes"
                    )
                return
            if isinstance(event, h11.InformationalResponse):
                continue
            # Until the final response head, h11 yields nothing else.
            assert isinstance(event, h11.Response), event
            if not 200 <= event.status_code < 300:
                raise self._refusal(event)
            self._established = True
            return

    def _buffered_size(self) -> int:
        return len(self._conn.trailing_data[0])

    def _refusal(self, response: h11.Response) -> ProxyRefused:
        status = response.status_code
        phrase = response.reason.decode("ascii", "backslashreplace")
        phrase = phrase[:MAX_REASON_PHRASE_IN_MESSAGE]
        if status == 407:
            return ProxyRefused(
                f"proxy requires authentication for CONNECT {self._authority} "
                f"(credentials missing or rejected): 407 {phrase}",
                "http-407",
            )
        return ProxyRefused(
            f"proxy refused CONNECT to {self._authority}: {status} {phrase}",
            f"http-{status}",
            host_unreachable=status in _UNREACHABLE_STATUSES,
        )

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
        return f"<{type(self).__name__} target={self._authority!r} {state}>"
