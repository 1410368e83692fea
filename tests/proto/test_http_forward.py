"""Absolute-form rewriting: what goes to the proxy is the client's request, minus hop-by-hop."""

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.http_forward import (
    MAX_EMPTY_LINES,
    EmptyLines,
    absolute_form,
    authority,
    bad_request,
    end_to_end_headers,
    forwardable_upgrade,
    forwarded_response,
    needs_tunnel,
)

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
value = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;=/.,", max_size=30).map(
    str.strip
)
path = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=40).map(lambda p: "/" + p)


def parse_request(raw: bytes):
    """What a proxy (or server) makes of these bytes: the request and its body."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    request, body = server.next_event(), b""
    while isinstance(event := server.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage)
    return request, body


def client_bytes(request: h11.Request, body: bytes) -> bytes:
    client = h11.Connection(h11.CLIENT)
    return client.send(request) + (client.send(h11.Data(data=body)) if body else b"") + client.send(h11.EndOfMessage())


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    target=path,
    headers=st.lists(
        st.tuples(
            token.filter(
                lambda n: (
                    n.encode()
                    not in (
                        b"host",
                        b"content-length",
                        b"transfer-encoding",
                        b"connection",
                        b"te",
                        b"trailer",
                        b"upgrade",
                        b"keep-alive",
                        b"proxy-connection",
                        b"proxy-authorization",
                        b"proxy-authenticate",
                    )
                )
            ),
            value,
        ),
        max_size=6,
    ),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
)
def test_rewrite_keeps_method_path_headers_and_body(method, target, headers, body, chunked):
    framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
    original = h11.Request(method=method, target=target, headers=[("Host", "mirror.example"), *headers, *framing])
    received, received_body = parse_request(client_bytes(original, body))
    forwarded = absolute_form(received, b"mirror.example", b"Basic abc")
    proxied, proxied_body = parse_request(client_bytes(forwarded, received_body))
    assert proxied.method == method.encode()
    assert proxied.target == b"http://mirror.example" + target.encode()
    assert proxied_body == body
    expected = [(b"host", b"mirror.example"), *((n.encode(), v.encode()) for n, v in headers)]
    assert [
        h for h in proxied.headers if h[0] not in (b"content-length", b"transfer-encoding", b"proxy-authorization")
    ] == expected
    assert (b"proxy-authorization", b"Basic abc") in proxied.headers


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    headers = [
        (b"host", b"h"),
        (b"connection", b"keep-alive, X-Secret-Hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret-hop", b"1"),
        (b"proxy-authorization", b"Basic client-guess"),
        (b"te", b"trailers"),
        (b"x-kept", b"yes"),
        (b"content-length", b"3"),
    ]
    assert end_to_end_headers(headers) == [(b"host", b"h"), (b"x-kept", b"yes"), (b"content-length", b"3")]


def test_framing_headers_stay_whatever_connection_names():
    """A body is framed by them: a Connection option naming one must not unframe it (RFC 9110 7.6.1
    makes named fields hop-by-hop, but the forwarded message still needs its framing)."""
    headers = [
        (b"host", b"h"),
        (b"connection", b"Content-Length, transfer-encoding, x-hop"),
        (b"content-length", b"5"),
        (b"x-hop", b"1"),
    ]
    assert end_to_end_headers(headers) == [(b"host", b"h"), (b"content-length", b"5")]
    chunked = [(b"connection", b"transfer-encoding"), (b"transfer-encoding", b"chunked")]
    assert end_to_end_headers(chunked) == [(b"transfer-encoding", b"chunked")]


def test_content_length_next_to_transfer_encoding_is_removed():
    """RFC 9112 6.3: Transfer-Encoding overrides it, and a sender must remove it before forwarding;
    kept, a next hop framing by it would read the chunked body differently (request smuggling)."""
    headers = [(b"host", b"h"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    assert end_to_end_headers(headers) == [(b"host", b"h"), (b"transfer-encoding", b"chunked")]


def test_http_10_request_without_host_gets_one():
    request = h11.Request(method="GET", target="/", headers=[], http_version="1.0")
    assert (b"host", b"10.0.0.1:8080") in absolute_form(request, authority("10.0.0.1", 8080), None).headers


def test_authority():
    assert authority("example.org", 80) == b"example.org"
    assert authority("example.org", 8080) == b"example.org:8080"
    assert authority("2001:db8::1", 80) == b"[2001:db8::1]"


def test_what_needs_a_tunnel():
    def request(method="GET", target="/", headers=()):
        return h11.Request(method=method, target=target, headers=[("Host", "h"), *headers])

    assert needs_tunnel(request(headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]))
    assert needs_tunnel(request(headers=[("Connection", "keep-alive, Upgrade")]))
    assert needs_tunnel(request(method="OPTIONS", target="*"))
    assert needs_tunnel(request(method="CONNECT", target="h:443"))
    assert not needs_tunnel(request(headers=[("Connection", "keep-alive")]))


def test_responses_lose_hop_by_hop_headers_but_keep_status():
    response = h11.Response(
        status_code=404, reason=b"Nope", headers=[("Connection", "close"), ("Content-Length", "0"), ("Via", "squid")]
    )
    forwarded = forwarded_response(response)
    assert (forwarded.status_code, forwarded.reason) == (404, b"Nope")
    assert forwarded.headers == [(b"content-length", b"0"), (b"via", b"squid")]
    informational = forwarded_response(h11.InformationalResponse(status_code=100, headers=[]))
    assert isinstance(informational, h11.InformationalResponse)


def test_http_1_0_on_either_side_is_sent_on_as_http_1_1():
    """h11 refuses to send any other version: copying 1.0 from a proxy or client would fail every exchange."""
    old_response = h11.Response(status_code=200, headers=[("Content-Length", "2")], http_version="1.0")
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    server.next_event()
    assert server.send(forwarded_response(old_response)).startswith(b"HTTP/1.1 200")
    old_request = h11.Request(method="GET", target="/", headers=[], http_version="1.0")
    client = h11.Connection(h11.CLIENT)
    assert client.send(absolute_form(old_request, b"h", None)).startswith(b"GET http://h/ HTTP/1.1")


def skipped(pieces) -> bytes:
    """What EmptyLines passes on of ``pieces`` fed one after the other."""
    lines = EmptyLines()
    return b"".join(lines.feed(piece) for piece in pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\n"]), max_size=MAX_EMPTY_LINES), st.lists(st.integers(0, 400)))
def test_empty_lines_before_a_request_line_are_dropped_however_split(empty, cuts):
    request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n\r\n"  # the empty line after it is the next request's
    data = b"".join(empty) + request
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    assert skipped([data[start:end] for start, end in zip(bounds, bounds[1:])]) == request


def test_empty_lines_are_bounded_and_a_bare_cr_is_not_one():
    assert skipped([b"\r\n" * (MAX_EMPTY_LINES + 1) + b"GET"]) == b"\r\nGET"  # h11 refuses it: a 400
    assert skipped([b"\r", b"\rGET"]) == b"\r\rGET"
    assert skipped([b"\r\n\r"]) == b""  # held: it may begin a CRLF


def test_a_bad_request_answer_is_well_framed_and_closes():
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(bad_request(431))
    response, data = client.next_event(), client.next_event()
    assert response.status_code == 431 and (b"connection", b"close") in response.headers
    assert data.data == b"431 Request Header Fields Too Large\n"
    assert isinstance(client.next_event(), h11.EndOfMessage) and client.our_state is h11.MUST_CLOSE


def test_an_upgrade_goes_on_with_its_offer_and_a_101_keeps_what_it_switched_to():
    headers = [
        ("Host", "h"),
        ("Upgrade", "websocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Key", "k"),
    ]
    request = h11.Request(method="GET", target="/ws", headers=headers)
    assert forwardable_upgrade(request) and needs_tunnel(request)
    assert not forwardable_upgrade(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    assert not forwardable_upgrade(h11.Request(method="GET", target="/", headers=headers, http_version="1.0"))
    for body in ([("Content-Length", "5")], [("Transfer-Encoding", "chunked")]):  # a 101 could cut it short
        assert not forwardable_upgrade(h11.Request(method="POST", target="/ws", headers=headers + body))
    assert forwardable_upgrade(h11.Request(method="POST", target="/ws", headers=[*headers, ("Content-Length", "0")]))
    forwarded = absolute_form(request, b"h", None, upgrade=True)
    assert (b"upgrade", b"websocket") in forwarded.headers and (b"connection", b"Upgrade") in forwarded.headers
    assert (b"sec-websocket-key", b"k") in forwarded.headers
    assert not any(name == b"upgrade" for name, _ in absolute_form(request, b"h", None).headers)
    switched = forwarded_response(h11.InformationalResponse(status_code=101, headers=headers[1:]))
    assert (b"upgrade", b"websocket") in switched.headers and (b"connection", b"Upgrade") in switched.headers
    final = forwarded_response(h11.Response(status_code=200, headers=headers[1:]))
    assert not any(name in (b"upgrade", b"connection") for name, _ in final.headers)
