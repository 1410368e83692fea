"""What a client is talking, and to which hostname, from its first bytes.

A transparent relay only sees an IP address. When the client's own DNS gave a
wrong one (a poisoned answer, a CDN node for another region), asking the far
side for that address defeats the tunnel; asking for the *name* lets the far
side resolve it. The name comes from the TLS ClientHello's SNI or the HTTP/1.x
Host header. Sniffing is bounded (MAX_SNIFF_BYTES), and a name is only ever
returned after strict validation: it goes into a CONNECT line or a SOCKS
request, so nothing the client controls may smuggle anything else in.
"""

import ipaddress
import re
from dataclasses import dataclass

import h11

from relay.proto.http_forward import MAX_EMPTY_LINES, leading_empty_lines

MAX_SNIFF_BYTES = 16 * 1024
MAX_HOSTNAME_LENGTH = 253

TLS = "tls"
HTTP = "http"

_TLS_HANDSHAKE = 0x16
_TLS_CLIENT_HELLO = 0x01
_SNI_EXTENSION = 0x0000
_SNI_HOST_NAME = 0x00
# A request line: METHOD SP target SP HTTP/1.x; methods are short upper-case tokens.
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} [\x21-\x7e]+ HTTP/1\.[01]\r?\n")
_METHOD_SO_FAR = re.compile(rb"[A-Z]{1,20}( [\x21-\x7e]*( [HTP/1.\r]*)?)?")
# A name whose last label is a number is an IPv4 address to some resolver: inet_aton reads
# 127.1, 0x7f000001, 0177.0.0.01 and 0x7F.0.0.0x1 as 127.0.0.1, and the URL standard takes
# any name ending in a number for an address.
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True)
class Sniffed:
    """The verdict: ``protocol`` is TLS, HTTP or None (not recognised); ``hostname`` is a valid name or None."""

    protocol: str | None
    hostname: str | None = None


NOT_RECOGNISED = Sniffed(None)


class Sniffer:
    """Feed the client's bytes until ``result`` is not None (it never changes after that)."""

    def __init__(self):
        self._buffer = bytearray()
        self.result: Sniffed | None = None

    @property
    def buffered(self) -> bytes:
        """Everything fed so far: it must still be sent upstream."""
        return bytes(self._buffer)

    def receive_data(self, data: bytes) -> Sniffed | None:
        if self.result is None:
            self._buffer += data
            self.result = sniff(self._buffer)
        return self.result

    def give_up(self) -> Sniffed:
        """No more bytes are coming in time (or at all): decide with what is there."""
        if self.result is None:
            self.result = NOT_RECOGNISED
        return self.result


def sniff(data: bytes) -> Sniffed | None:
    """The verdict for these first bytes of a connection, or None if more bytes are needed."""
    if not data:
        return None
    if data[0] == _TLS_HANDSHAKE:
        verdict = _sniff_tls(data)
    else:
        verdict = _sniff_http(data)
    if verdict is None and len(data) >= MAX_SNIFF_BYTES:
        return NOT_RECOGNISED if data[0] != _TLS_HANDSHAKE else Sniffed(TLS)
    return verdict


def valid_hostname(name: str) -> str | None:
    """``name`` lower-cased if it is a plain DNS hostname we may ask a proxy for, else None.

    IP literals are refused (the original destination already says which IP),
    and so is localhost, which would mean the *proxy's* own machine.
    """
    name = name.lower().removesuffix(".")
    if not name or len(name) > MAX_HOSTNAME_LENGTH or not name.isascii():
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMBER.fullmatch(labels[-1]) or name == "localhost" or name.endswith(".localhost"):
        return None  # an IPv4 literal in disguise, or the proxy's own loopback
    return name


# -- TLS -------------------------------------------------------------------------


def _sniff_tls(data: bytes) -> Sniffed | None:
    """Collect the handshake bytes of consecutive TLS records and parse the ClientHello in them."""
    handshake = bytearray()
    position = 0
    while position < len(data) and not _hello_complete(handshake):
        header = data[position : position + 5]
        if len(header) >= 2 and header[1] != 3:
            return NOT_RECOGNISED if position == 0 else Sniffed(TLS)
        if len(header) < 5:
            break
        if header[0] != _TLS_HANDSHAKE:
            return Sniffed(TLS)  # the hello ended without an SNI we could read
        length = int.from_bytes(header[3:5], "big")
        handshake += data[position + 5 : position + 5 + length]
        position += 5 + length
    if len(handshake) < 4:
        return None
    if handshake[0] != _TLS_CLIENT_HELLO:
        return Sniffed(TLS)
    hello_length = int.from_bytes(handshake[1:4], "big")
    if len(handshake) < 4 + hello_length:
        return None if 4 + hello_length <= MAX_SNIFF_BYTES else Sniffed(TLS)
    return Sniffed(TLS, _server_name(bytes(handshake[4 : 4 + hello_length])))


def _hello_complete(handshake: bytearray) -> bool:
    return len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big")


def _server_name(hello: bytes) -> str | None:
    """SNI host_name from a ClientHello body, or None if absent or malformed."""
    reader = _Reader(hello)
    try:
        reader.skip(2 + 32)  # legacy_version, random
        reader.skip(reader.number(1))  # legacy_session_id
        reader.skip(reader.number(2))  # cipher_suites
        reader.skip(reader.number(1))  # legacy_compression_methods
        extensions = _Reader(reader.take(reader.number(2)))
        while extensions.left:
            kind, body = extensions.number(2), extensions.take(extensions.number(2))
            if kind != _SNI_EXTENSION:
                continue
            names = _Reader(body)
            names = _Reader(names.take(names.number(2)))
            while names.left:
                name_type, name = names.number(1), names.take(names.number(2))
                if name_type == _SNI_HOST_NAME:
                    return valid_hostname(name.decode("ascii")) if name.isascii() else None
            return None
    except _Truncated:
        return None
    return None


class _Truncated(Exception):
    pass


class _Reader:
    """Bounds-checked reads from a bytes object; running past the end raises _Truncated."""

    def __init__(self, data: bytes):
        self.data = data
        self.offset = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise _Truncated
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def skip(self, size: int) -> None:
        self.take(size)

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")


# -- HTTP ------------------------------------------------------------------------


def _sniff_http(data: bytes) -> Sniffed | None:
    data = data[leading_empty_lines(data, MAX_EMPTY_LINES)[1] :]  # skipped as the forwarder skips them
    if data in (b"", b"\r"):
        return None
    line_end = data.find(b"\n")
    if line_end < 0:
        return None if _METHOD_SO_FAR.fullmatch(data) else NOT_RECOGNISED
    if not _REQUEST_LINE.match(data):
        return NOT_RECOGNISED
    head_end = _head_end(data)
    if head_end is None:
        return None
    return Sniffed(HTTP, _host_header(data[:head_end]))


def _head_end(data: bytes) -> int | None:
    for terminator in (b"\r\n\r\n", b"\n\n"):
        index = data.find(terminator)
        if index >= 0:
            return index + len(terminator)
    return None


def _host_header(head: bytes) -> str | None:
    """The valid hostname in the Host header of a complete request head, as h11 reads it."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_SNIFF_BYTES)
    parser.receive_data(head)
    try:
        request = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(request, h11.Request):
        return None
    for name, value in request.headers:
        if name == b"host":
            return hostname_from_authority(value.decode("ascii", "replace"))
    return None


def hostname_from_authority(authority: str) -> str | None:
    """The valid hostname in a Host header value (``name[:port]``), or None (IP literals included)."""
    host, _, port = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    if port and not port.isdigit():
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        return valid_hostname(host)
