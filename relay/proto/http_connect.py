"""Client side of an HTTP CONNECT proxy handshake, on top of h11.

Same interface as the SOCKS clients: ``data_to_send()``, ``receive_data()``,
``established`` and ``trailing_data``.
"""

import base64

import h11

from relay.proto.errors import LocalProtocolError, ProxyRefused, RemoteProtocolError
from relay.proto.handshake import (
    Handshake,
    encode_hostname,
    parse_ip_literal,
)

MAX_REPLY_HEAD_SIZE = 16 * 1024
MAX_REASON_PHRASE_IN_MESSAGE = 100
# Besides whitespace and controls, these would change the meaning of "host:port".
_AUTHORITY_DELIMITERS = frozenset("/?#@[]:")
# Answers that say the proxy could not reach the target (squid: 503 ERR_DNS_FAIL, 502/503
# ERR_CONNECT_FAIL, 504 ERR_READ_TIMEOUT, 500 for a DNS timeout; privoxy: 404 "No such domain"):
# asked by name, asking by address may work. Any other refusal (403: squid's rules forbid
# the port or the method) says nothing about the name, and asking again only adds a denial.
_UNREACHABLE_STATUSES = frozenset({404, 500, 502, 503, 504})


def _validate_hostname(host: str) -> None:
    encode_hostname(host)
    if not host.isprintable() or any(c.isspace() or c in _AUTHORITY_DELIMITERS for c in host):
        raise LocalProtocolError(f"hostname {host!r} cannot go in a CONNECT request")


def basic_credentials(username: str, password: str) -> bytes:
    """The value of a Proxy-Authorization header for HTTP Basic auth (RFC 7617)."""
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


class HttpConnectClient(Handshake):
    """HTTP/1.1 CONNECT, with Basic proxy authentication when credentials are given.

    ``early_data``: bytes for the destination, sent right after the request in
    the same write instead of after the proxy's 2xx (a round trip sooner), for a
    proxy known to keep them for the tunnel (squid, tinyproxy). The request then
    says ``Connection: close`` (the IETF optimistic-upgrade draft): a proxy that
    refuses must close, not read those bytes as a next request. On a refusal
    they are lost with the connection: the caller still has them to send again.
    """

    _CLOSED_EARLY_MESSAGE = "proxy closed the connection before answering CONNECT {target}"

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        early_data: bytes = b"",
    ) -> None:
        super().__init__(host, port)
        if parse_ip_literal(host) is None:
            _validate_hostname(host)
        # The target goes as it is in the request line and the Host header.
        headers = [("Host", self._target)]
        if (username is None) != (password is None):
            raise LocalProtocolError("username and password must be given together")
        if username is not None:
            if ":" in username:
                raise LocalProtocolError("a Basic auth username cannot contain ':' (RFC 7617)")
            headers.append((b"Proxy-Authorization", basic_credentials(username, password)))
        if early_data:
            headers.append(("Connection", "close"))
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REPLY_HEAD_SIZE)
        request = h11.Request(method="CONNECT", target=self._target, headers=headers)
        self._outgoing += self._conn.send(request) + self._conn.send(h11.EndOfMessage()) + early_data

    def _receive(self, data: bytes) -> None:
        try:
            self._feed(data)
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"malformed reply from the proxy to CONNECT {self._target}: {exc}") from exc

    def _feed(self, data: bytes) -> None:
        while data:
            # h11 only bounds heads that are still incomplete. Handing it no
            # more than fills one maximal head makes the bound hold for
            # complete heads too, however the bytes were split.
            room = MAX_REPLY_HEAD_SIZE - self._buffered_size()
            self._conn.receive_data(data[:room])
            data = data[room:]
            if self._final_reply_is_success():
                # A 2xx to CONNECT switches protocols: whatever follows the head
                # is tunnel data, whatever Content-Length said.
                self._establish(self._conn.trailing_data[0] + data)
                return

    def _final_reply_is_success(self) -> bool:
        """Process h11's events: False while the final head is incomplete, raise on non-2xx."""
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if self._buffered_size() >= MAX_REPLY_HEAD_SIZE:
                    raise RemoteProtocolError(
                        f"proxy reply head to CONNECT {self._target} exceeds {MAX_REPLY_HEAD_SIZE} bytes"
                    )
                return False
            if isinstance(event, h11.InformationalResponse):
                continue
            # Until the final response head, h11 yields nothing else.
            assert isinstance(event, h11.Response), event
            if not 200 <= event.status_code < 300:
                raise self._refusal(event)
            return True

    def _buffered_size(self) -> int:
        return len(self._conn.trailing_data[0])

    def _refusal(self, response: h11.Response) -> ProxyRefused:
        status = response.status_code
        phrase = response.reason.decode("ascii", "backslashreplace")
        phrase = phrase[:MAX_REASON_PHRASE_IN_MESSAGE]
        if status == 407:
            return ProxyRefused(
                f"proxy requires authentication for CONNECT {self._target} "
                f"(credentials missing or rejected): 407 {phrase}",
                "http-407",
            )
        return ProxyRefused(
            f"proxy refused CONNECT to {self._target}: {status} {phrase}",
            f"http-{status}",
            host_unreachable=status in _UNREACHABLE_STATUSES,
        )
