"""Client side of the SOCKS4, SOCKS4a and SOCKS5 (RFC 1928 + RFC 1929) handshakes.

Each client is a sans-IO ``Handshake`` (see ``relay.proto.handshake``).
"""

import enum
import ipaddress
import struct

from relay.proto.errors import LocalProtocolError, ProxyRefused, RemoteProtocolError
from relay.proto.handshake import (
    Handshake,
    encode_hostname,
    parse_ip_literal,
)

MAX_CREDENTIAL_SIZE = 255


def _encode_socks_hostname(host: str) -> bytes:
    encoded = encode_hostname(host)
    if b"\0" in encoded:
        raise LocalProtocolError(f"hostname {host!r} contains a NUL byte")
    return encoded


class _SocksHandshake(Handshake):
    """A SOCKS client buffers the proxy's bytes in ``_incoming`` until a reply is whole.

    Subclasses implement ``_advance()``, which consumes complete replies from
    ``_incoming`` and leaves an incomplete one there for the next feed.
    """

    _CLOSED_EARLY_MESSAGE = "proxy closed the connection during the SOCKS handshake for {target}"

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._incoming = bytearray()

    def _receive(self, data: bytes) -> None:
        self._incoming += data
        self._advance()

    def _advance(self) -> None:
        raise NotImplementedError

    def _establish_after_reply(self, reply_size: int) -> None:
        """The success reply fills the first ``reply_size`` bytes of ``_incoming``."""
        tunnel_data = bytes(self._incoming[reply_size:])
        self._incoming.clear()
        self._establish(tunnel_data)


# --- SOCKS4 / SOCKS4a -------------------------------------------------------

SOCKS4_VERSION = 4
SOCKS4_CONNECT = 1
SOCKS4_GRANTED = 90
SOCKS4_REPLY_SIZE = 8
# SOCKS4a: an address 0.0.0.x (x != 0) tells the proxy to resolve the hostname
# that follows the user id.
SOCKS4A_HOSTNAME_MARKER = ipaddress.IPv4Address("0.0.0.1")

_SOCKS4_REFUSALS = {
    91: ("socks4-rejected", "request rejected or failed", True),
    92: ("socks4-identd-unreachable", "proxy could not reach our identd", False),
    93: ("socks4-identd-mismatch", "identd reported a different user id", False),
}


class Socks4Client(_SocksHandshake):
    """SOCKS4 CONNECT, or SOCKS4a when ``use_4a`` and ``host`` is a hostname."""

    def __init__(self, host: str, port: int, user_id: str = "", use_4a: bool = False) -> None:
        super().__init__(host, port)
        encoded_user_id = user_id.encode("utf-8")
        if b"\0" in encoded_user_id:
            raise LocalProtocolError("SOCKS4 user id must not contain a NUL byte")
        address = parse_ip_literal(host)
        if isinstance(address, ipaddress.IPv6Address):
            raise LocalProtocolError(f"SOCKS4 cannot carry the IPv6 address {host!r}")
        if address is not None and address.packed[:3] == b"\0\0\0" and address.packed[3] != 0:
            # Sent as it is, a SOCKS4a proxy would wait for a hostname after the user id.
            raise LocalProtocolError(
                f"SOCKS4 cannot carry {host!r}: proxies read 0.0.0.x as the SOCKS4a hostname marker"
            )
        if address is None and not use_4a:
            raise LocalProtocolError(
                f"SOCKS4 needs an IPv4 address, got the hostname {host!r} (SOCKS4a lets the proxy resolve it)"
            )
        header_address = address if address is not None else SOCKS4A_HOSTNAME_MARKER
        request = struct.pack("!BBH4s", SOCKS4_VERSION, SOCKS4_CONNECT, port, header_address.packed)
        request += encoded_user_id + b"\0"
        if address is None:
            request += _encode_socks_hostname(host) + b"\0"
        self._outgoing += request

    def _advance(self) -> None:
        if len(self._incoming) < 2:
            return
        version, code = self._incoming[0], self._incoming[1]
        # The reply version is 0 per the spec, but some servers echo 4.
        if version not in (0, SOCKS4_VERSION):
            raise RemoteProtocolError(f"proxy sent a SOCKS4 reply with version {version}")
        if code in _SOCKS4_REFUSALS:
            reason, description, host_unreachable = _SOCKS4_REFUSALS[code]
            raise ProxyRefused(
                f"SOCKS4 proxy refused CONNECT to {self._target}: {description} (code {code})",
                reason,
                host_unreachable=host_unreachable,
            )
        if code != SOCKS4_GRANTED:
            raise RemoteProtocolError(f"proxy sent the unknown SOCKS4 reply code {code}")
        if len(self._incoming) < SOCKS4_REPLY_SIZE:
            return
        self._establish_after_reply(SOCKS4_REPLY_SIZE)


# --- SOCKS5 -----------------------------------------------------------------

SOCKS5_VERSION = 5
SOCKS5_CONNECT = 1
SOCKS5_AUTH_VERSION = 1
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

_SOCKS5_REFUSALS = {
    1: ("general-failure", "general SOCKS server failure"),
    2: ("not-allowed", "connection not allowed by ruleset"),
    3: ("network-unreachable", "network unreachable"),
    4: ("host-unreachable", "host unreachable"),
    5: ("connection-refused", "connection refused"),
    6: ("ttl-expired", "TTL expired"),
    7: ("command-not-supported", "command not supported"),
    8: ("address-type-not-supported", "address type not supported"),
}
_SOCKS5_UNREACHABLE_CODES = {3, 4}


class _Socks5State(enum.Enum):
    AWAIT_METHOD = enum.auto()
    AWAIT_AUTH = enum.auto()
    AWAIT_REPLY = enum.auto()


class Socks5Client(_SocksHandshake):
    """SOCKS5 CONNECT, with username/password authentication when credentials are given.

    By default messages go out one after another, each after the proxy
    answered the previous one: some servers drop pipelined handshakes.
    ``pipelined``: greeting, authentication and request go out at once, a
    round trip or two sooner; the greeting then offers only the method whose
    message follows it (username/password with credentials, else none), and
    the replies are still checked one by one, in order. Until a byte of the
    request's reply has come, a failure may be the proxy not taking pipelined
    messages (``pipelining_unconfirmed``): the caller may try again without.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        pipelined: bool = False,
    ) -> None:
        super().__init__(host, port)
        if (username is None) != (password is None):
            raise LocalProtocolError("username and password must be given together")
        self._connect_request = self._build_connect_request(host, port)
        self._auth_request = b""
        self._offered_methods = bytes([METHOD_NO_AUTH])
        if username is not None and password is not None:
            self._auth_request = self._build_auth_request(username, password)
            self._offered_methods = bytes(
                [METHOD_USERNAME_PASSWORD] if pipelined else [METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD]
            )
        self._pipelined = pipelined
        self._state = _Socks5State.AWAIT_METHOD
        self._bound_address: tuple[str, int] | None = None
        greeting = bytes([SOCKS5_VERSION, len(self._offered_methods)]) + self._offered_methods
        self._outgoing += greeting
        if pipelined:
            self._outgoing += self._auth_request + self._connect_request

    @property
    def pipelining_unconfirmed(self) -> bool:
        """Pipelined, and no byte of the request's reply has come: the proxy may not take pipelined messages."""
        replying = self._state is _Socks5State.AWAIT_REPLY and bool(self._incoming)
        return self._pipelined and not self._established and not replying

    @property
    def bound_address(self) -> tuple[str, int] | None:
        """BND.ADDR and BND.PORT from the proxy's success reply."""
        return self._bound_address

    @staticmethod
    def _build_connect_request(host: str, port: int) -> bytes:
        address = parse_ip_literal(host)
        if isinstance(address, ipaddress.IPv4Address):
            destination = bytes([ATYP_IPV4]) + address.packed
        elif isinstance(address, ipaddress.IPv6Address):
            destination = bytes([ATYP_IPV6]) + address.packed
        else:
            hostname = _encode_socks_hostname(host)
            destination = bytes([ATYP_DOMAIN, len(hostname)]) + hostname
        return bytes([SOCKS5_VERSION, SOCKS5_CONNECT, 0]) + destination + struct.pack("!H", port)

    @staticmethod
    def _build_auth_request(username: str, password: str) -> bytes:
        encoded_username = username.encode("utf-8")
        encoded_password = password.encode("utf-8")
        for field, encoded in (("username", encoded_username), ("password", encoded_password)):
            if len(encoded) > MAX_CREDENTIAL_SIZE:
                # Sizes only: the message must never echo the credentials.
                raise LocalProtocolError(f"SOCKS5 {field} is {len(encoded)} bytes; at most {MAX_CREDENTIAL_SIZE} fit")
        return (
            bytes([SOCKS5_AUTH_VERSION, len(encoded_username)])
            + encoded_username
            + bytes([len(encoded_password)])
            + encoded_password
        )

    def _advance(self) -> None:
        # A server that answers ahead of our next message is harmless: its
        # replies are still checked one by one, in order.
        if self._state is _Socks5State.AWAIT_METHOD and not self._receive_method_choice():
            return
        if self._state is _Socks5State.AWAIT_AUTH and not self._receive_auth_status():
            return
        if self._state is _Socks5State.AWAIT_REPLY:
            self._receive_connect_reply()

    def _receive_method_choice(self) -> bool:
        if len(self._incoming) < 2:
            return False
        version, method = self._incoming[0], self._incoming[1]
        if version != SOCKS5_VERSION:
            raise RemoteProtocolError(f"proxy answered the SOCKS5 greeting with version {version}")
        del self._incoming[:2]
        if method == METHOD_NONE_ACCEPTABLE:
            raise ProxyRefused(
                f"SOCKS5 proxy accepted none of our authentication methods for {self._target}",
                "socks5-no-acceptable-method",
            )
        if method not in self._offered_methods:
            raise RemoteProtocolError(
                f"proxy chose the SOCKS5 authentication method {method:#04x}, which we did not offer"
            )
        if method == METHOD_USERNAME_PASSWORD:
            self._send_unless_pipelined(self._auth_request)
            self._state = _Socks5State.AWAIT_AUTH
        else:
            self._send_unless_pipelined(self._connect_request)
            self._state = _Socks5State.AWAIT_REPLY
        return True

    def _send_unless_pipelined(self, message: bytes) -> None:
        if not self._pipelined:  # pipelined, it went out with the greeting
            self._outgoing += message

    def _receive_auth_status(self) -> bool:
        if len(self._incoming) < 2:
            return False
        version, status = self._incoming[0], self._incoming[1]
        # RFC 1929 says version 1, but some servers answer with 5.
        if version not in (SOCKS5_AUTH_VERSION, SOCKS5_VERSION):
            raise RemoteProtocolError(f"proxy answered SOCKS5 authentication with version {version}")
        del self._incoming[:2]
        if status != 0:
            raise ProxyRefused(
                f"SOCKS5 proxy rejected our username/password for {self._target} (status {status})",
                "socks5-auth-failed",
            )
        self._send_unless_pipelined(self._connect_request)
        self._state = _Socks5State.AWAIT_REPLY
        return True

    def _receive_connect_reply(self) -> None:
        reply = self._incoming
        if len(reply) < 2:
            return
        version, code = reply[0], reply[1]
        if version != SOCKS5_VERSION:
            raise RemoteProtocolError(f"proxy sent a SOCKS5 reply with version {version}")
        if code != 0:
            raise self._refusal(code)
        # reply[2] is RSV: meant to be 0, ignored as other clients do.
        if len(reply) < 4:
            return
        address_type = reply[3]
        if address_type == ATYP_IPV4:
            address_size = 4
        elif address_type == ATYP_IPV6:
            address_size = 16
        elif address_type == ATYP_DOMAIN:
            if len(reply) < 5:
                return
            address_size = 1 + reply[4]
        else:
            raise RemoteProtocolError(f"proxy sent a SOCKS5 reply with the unknown address type {address_type}")
        port_offset = 4 + address_size
        reply_size = port_offset + 2
        if len(reply) < reply_size:
            return
        raw_address = bytes(reply[4:port_offset])
        if address_type == ATYP_DOMAIN:
            bound_host = raw_address[1:].decode("ascii", "backslashreplace")
        else:
            bound_host = str(ipaddress.ip_address(raw_address))
        (bound_port,) = struct.unpack_from("!H", reply, port_offset)
        self._bound_address = (bound_host, bound_port)
        self._establish_after_reply(reply_size)

    def _refusal(self, code: int) -> ProxyRefused:
        word, description = _SOCKS5_REFUSALS.get(code, (f"error-{code}", "unknown error"))
        return ProxyRefused(
            f"SOCKS5 proxy refused CONNECT to {self._target}: {description} (code {code})",
            f"socks5-{word}",
            host_unreachable=code in _SOCKS5_UNREACHABLE_CODES,
        )


SOCKS5_UDP_ASSOCIATE = 3


class Socks5UdpAssociate(Socks5Client):
    """SOCKS5 UDP ASSOCIATE (RFC 1928 §7): the same greeting and authentication as CONNECT (pipelined
    too, if asked), then a request for a UDP relay; ``bound_address`` is where the proxy takes this
    association's datagrams (an unspecified address there means the proxy's own, the one the control
    connection reached).

    The request names the address datagrams will come from as all zeros: the relay may be behind NAT,
    where the one it would name is not the one the proxy sees (RFC 1928: "MUST use ... all zeros").
    """

    _CLOSED_EARLY_MESSAGE = "proxy closed the connection during the SOCKS5 UDP ASSOCIATE handshake"

    def __init__(self, username: str | None = None, password: str | None = None, pipelined: bool = False) -> None:
        super().__init__("0.0.0.0", 1, username, password, pipelined)  # no destination: see _build_connect_request
        self._target = "UDP ASSOCIATE"

    @staticmethod
    def _build_connect_request(host: str, port: int) -> bytes:
        return bytes([SOCKS5_VERSION, SOCKS5_UDP_ASSOCIATE, 0, ATYP_IPV4]) + bytes(6)

    def _refusal(self, code: int) -> ProxyRefused:
        word, description = _SOCKS5_REFUSALS.get(code, (f"error-{code}", "unknown error"))
        return ProxyRefused(f"SOCKS5 proxy refused UDP ASSOCIATE: {description} (code {code})", f"socks5-{word}")
