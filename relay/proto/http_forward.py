"""Rewriting plain HTTP/1.x requests for a forward proxy (absolute form), on h11 events.

Through an HTTP proxy, plain HTTP goes as ``GET http://host/path HTTP/1.1``
rather than inside a CONNECT tunnel: stock squid refuses CONNECT to port 80,
and the proxy then resolves ``host`` itself. Hop-by-hop headers (RFC 9110
7.6.1) are dropped on the way in both directions; framing headers
(Content-Length, Transfer-Encoding) stay even where the Connection header names
them, because h11 frames the forwarded body by them.
"""

from http import HTTPStatus

import h11

from relay.addresses import bracketed

# Empty lines skipped before a request line (RFC 9112 2.2: a server SHOULD ignore at least one, as
# squid and nginx do); more than this is no client's slip, and h11 refuses the next one.
MAX_EMPTY_LINES = 100

# Hop-by-hop fields, plus the ones the client meant for a proxy it does not know it has.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def end_to_end_headers(headers) -> list[tuple[bytes, bytes]]:
    """``headers`` as forwarded: without hop-by-hop fields, including those the Connection header
    names other than the framing ones, and without a Content-Length that Transfer-Encoding
    overrides (RFC 9112 6.3: a next hop framing by it would read a different body)."""
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    dropped = HOP_BY_HOP | (named - FRAMING)
    if any(name == b"transfer-encoding" for name, _ in headers):
        dropped |= {b"content-length"}
    return [(name, value) for name, value in headers if name not in dropped]


def needs_tunnel(request: h11.Request) -> bool:
    """Requests that absolute form cannot carry: upgrades (WebSocket), CONNECT, OPTIONS *."""
    if request.method == b"CONNECT" or not request.target.startswith(b"/"):
        return True
    return any(name == b"upgrade" for name, _ in request.headers) or any(
        name == b"connection" and b"upgrade" in value.lower() for name, value in request.headers
    )


def forwardable_upgrade(request: h11.Request) -> bool:
    """An Upgrade request (WebSocket over ws://) that absolute form can carry to a proxy that
    forwards upgrades (squid 5 with http_upgrade_request_protocols): HTTP/1.1, origin form, no body
    (a 101 could come before the body is all sent, and the bytes after the switch would then mix the
    body's rest with the new protocol's)."""
    fields = dict(request.headers)  # h11 lower-cases names; a repeated Content-Length it has refused
    return (
        request.http_version == b"1.1"
        and request.method != b"CONNECT"
        and request.target.startswith(b"/")
        and b"upgrade" in fields
        and b"transfer-encoding" not in fields
        and fields.get(b"content-length", b"0") == b"0"
    )


def upgrade_headers(headers) -> list[tuple[bytes, bytes]]:
    """The Upgrade fields of ``headers`` and the Connection option naming them, to go one hop further."""
    offered = [(name, value) for name, value in headers if name == b"upgrade"]
    return [*offered, (b"connection", b"Upgrade")] if offered else []


def authority(host: str, port: int) -> bytes:
    """``host[:port]`` for an absolute-form URL (port 80 is implied by http://)."""
    shown = bracketed(host)
    return (shown if port == 80 else f"{shown}:{port}").encode("ascii")


def absolute_form(
    request: h11.Request, target_authority: bytes, proxy_authorization: bytes | None, upgrade: bool = False
) -> h11.Request:
    """The request as sent to a forward proxy; ``upgrade``: with its Upgrade offer (see forwardable_upgrade)."""
    headers = end_to_end_headers(request.headers)
    if upgrade:
        headers += upgrade_headers(request.headers)
    if not any(name == b"host" for name, _ in headers):  # HTTP/1.0 clients may omit it; h11 speaks 1.1
        headers.insert(0, (b"host", target_authority))
    if proxy_authorization is not None:
        headers.append((b"proxy-authorization", proxy_authorization))
    return h11.Request(
        method=request.method,
        target=b"http://" + target_authority + request.target,
        headers=headers,
    )  # as HTTP/1.1 whatever the client spoke: h11 sends nothing else, and a proxy speaks it


def forwarded_response(response):
    """A proxy's (informational or final) response as sent on to the client; a 101 keeps the
    protocol switched to."""
    headers = end_to_end_headers(response.headers)
    if response.status_code == 101:
        headers += upgrade_headers(response.headers)
    return type(response)(
        status_code=response.status_code, headers=headers, reason=response.reason
    )  # as HTTP/1.1 (h11 sends nothing else); h11 frames the body for an HTTP/1.0 client


def leading_empty_lines(data: bytes, limit: int) -> tuple[int, int]:
    """How many empty lines (CRLF or LF, at most ``limit``) ``data`` begins with, and where the rest begins."""
    lines = position = 0
    while lines < limit:
        if data.startswith(b"\n", position):
            position += 1
        elif data.startswith(b"\r\n", position):
            position += 2
        else:
            break
        lines += 1
    return lines, position


class EmptyLines:
    """Drops the empty lines before one request line, at most MAX_EMPTY_LINES; feed it every byte
    read until then (h11 refuses an empty line where it expects a request line)."""

    def __init__(self):
        self.skipped = 0
        self.held = b""  # a CR that may begin a CRLF
        self.passing = False  # the request line began: everything passes as it is

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` goes to the parser (b"" for ``data`` b"": the end of data)."""
        if self.passing or not data:
            return data
        data = self.held + data
        lines, start = leading_empty_lines(data, MAX_EMPTY_LINES - self.skipped)
        self.skipped += lines
        rest = data[start:]
        self.held = rest if rest == b"\r" and self.skipped < MAX_EMPTY_LINES else b""
        if self.held:
            return b""
        self.passing = bool(rest)
        return rest


def bad_request(status: int) -> bytes:
    """The response that ends a connection whose client broke the protocol (h11's hint: 400, or 431)."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    head = f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
