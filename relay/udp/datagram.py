"""The SOCKS5 UDP request header (RFC 1928 §7), sans-IO.

Every datagram between the relay and the proxy's UDP relay address carries it::

    +----+------+------+----------+----------+----------+
    |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    +----+------+------+----------+----------+----------+
    | 2  |  1   |  1   | Variable |    2     | Variable |

A datagram is always whole (UDP), so decoding takes one and either returns its parts or raises
:class:`BadDatagram` with a reason fit for a metric label.
"""

import functools
import ipaddress
import struct

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4
_ADDRESS_SIZES = {ATYP_IPV4: 4, ATYP_IPV6: 16}
# The largest header: a 255-byte domain name. An IPv4 header is 10 bytes, an IPv6 one 22.
MAX_HEADER_SIZE = 4 + 1 + 255 + 2


class BadDatagram(Exception):
    """A datagram from the proxy that cannot be relayed; ``reason`` is a short word for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=4096)  # per datagram, and a client talks to few destinations; bounded
def header(host: str, port: int) -> bytes:
    """The header for a datagram to ``host``:``port`` (an IP literal: TPROXY gives addresses, never names)."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1-65535")
    address = ipaddress.ip_address(host)
    kind = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((0, 0, 0, kind)) + address.packed + struct.pack("!H", port)


def encode(host: str, port: int, payload: bytes) -> bytes:
    """``payload`` for ``host``:``port``, as the proxy's UDP relay address takes it."""
    return header(host, port) + payload


def decode(datagram: bytes | memoryview) -> tuple[str, int, bytes | memoryview]:
    """(source host, source port, payload) of a datagram the proxy relays back; the payload is a slice of
    ``datagram`` (given a memoryview, a view: no copy).

    Raises BadDatagram for a short or malformed header, a fragment (FRAG != 0: RFC 1928 makes
    reassembly optional, and no proxy in use sends fragments) or a domain name as the source (a reply
    must come from an address, the one the client's datagram went to).
    """
    if len(datagram) < 4:
        raise BadDatagram("malformed", f"a {len(datagram)}-byte datagram has no SOCKS5 UDP header")
    if datagram[0] or datagram[1]:
        raise BadDatagram("malformed", "the SOCKS5 UDP header's reserved bytes are not zero")
    if datagram[2]:
        raise BadDatagram("fragment", f"a SOCKS5 UDP fragment ({datagram[2]}), which is not reassembled")
    kind = datagram[3]
    if kind == ATYP_DOMAIN:
        raise BadDatagram("malformed", "a SOCKS5 UDP reply from a domain name, not an address")
    size = _ADDRESS_SIZES.get(kind)
    if size is None:
        raise BadDatagram("malformed", f"the SOCKS5 UDP header's address type {kind} is unknown")
    end = 4 + size + 2
    if len(datagram) < end:
        raise BadDatagram("malformed", f"a {len(datagram)}-byte datagram cuts its SOCKS5 UDP header short")
    host, port = _source(bytes(datagram[4:end]))
    if port == 0:
        raise BadDatagram("malformed", "a SOCKS5 UDP reply from port 0")
    return host, port, datagram[end:]


@functools.lru_cache(maxsize=4096)  # per datagram, and replies come from few sources; bounded
def _source(packed: bytes) -> tuple[str, int]:
    """(host, port) of a header's address and port bytes."""
    return str(ipaddress.ip_address(packed[:-2])), struct.unpack("!H", packed[-2:])[0]
