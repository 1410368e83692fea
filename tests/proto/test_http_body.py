"""Letting body bytes go by h11 unseen (relay.proto.http_body): what may pass, how h11 on each
side is told, and that a message relayed so arrives as it would have through h11 alone."""

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.proto.http_body import framing, passable, passed


def request_head(framing_header: str) -> bytes:
    return f"POST /upload HTTP/1.1\r\nHost: mirror.example\r\n{framing_header}\r\n\r\n".encode()


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, position = bytearray(), 0
    for size in sizes:
        piece = body[position : position + size]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        position += size
    if position < len(body):
        out += b"%x\r\n" % (len(body) - position) + body[position:] + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def relay(message: bytes, pieces: list[int], pass_min: int = 1) -> tuple[bytes, bytes, int]:
    """Relay one request as the forwarder does: h11 reads ``message`` (fed in ``pieces``) and
    another h11 writes it on, except for the bytes passable() lets go by, which are copied as a
    splice would move them. Returns (what was written, what h11 left unread, bytes passed)."""
    receiving, sending = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    out, position, went_by = bytearray(), 0, 0
    sizes = iter(pieces)
    while True:
        event = receiving.next_event()
        if event is h11.NEED_DATA:
            count = passable(receiving)
            if count >= pass_min and (frame := framing(sending, count)) is not None:
                out += frame[0] + message[position : position + count] + frame[1]
                position += count
                went_by += count
                passed(receiving, count)
                continue
            size = next(sizes, len(message))
            receiving.receive_data(message[position : position + max(size, 1)])
            position += max(size, 1)
            continue
        out += sending.send(event)
        if isinstance(event, h11.EndOfMessage):
            return bytes(out), receiving.trailing_data[0] + message[position:], went_by


def parsed_body(wire: bytes) -> bytes:
    reader = h11.Connection(h11.SERVER)
    reader.receive_data(wire)
    body = b""
    while not isinstance(event := reader.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA, "the relayed message is incomplete"
        if isinstance(event, h11.Data):
            body += event.data
    assert reader.trailing_data == (b"", False)  # nothing past its end either
    return body


TRAILING = b"GET /next HTTP/1.1\r\nHost: mirror.example\r\n\r\n"


@pytest.mark.parametrize("feed", ["whole", "bytewise", "head-then-rest"])
def test_a_content_length_body_passes_but_its_last_byte(feed):
    body = bytes(range(256)) * 40
    head = request_head(f"Content-Length: {len(body)}")
    message = head + body + TRAILING
    pieces = {"whole": [len(head)], "bytewise": [1] * len(message), "head-then-rest": [len(head), len(message)]}[feed]
    wire, left, went_by = relay(message, pieces)
    assert parsed_body(wire) == body
    assert left == TRAILING  # the next request stays for the next cycle
    assert went_by == len(body) - 1


def test_a_chunked_body_passes_each_chunk_but_its_last_byte():
    body = bytes(range(256)) * 100
    head = request_head("Transfer-Encoding: chunked")
    message = head + chunked(body, [10000, 1, 5000]) + TRAILING
    wire, left, went_by = relay(message, [len(head) + 8])  # the first chunk's header, nothing of its data
    assert parsed_body(wire) == body
    assert left == TRAILING
    assert 0 < went_by < len(body)


def test_bytes_read_with_the_head_go_through_h11_first():
    body = b"a" * 50000
    head = request_head(f"Content-Length: {len(body)}")
    receiving = h11.Connection(h11.SERVER)
    receiving.receive_data(head + body[:1000])
    assert isinstance(receiving.next_event(), h11.Request)
    assert passable(receiving) == 0  # 1000 bytes wait in h11's buffer
    assert receiving.next_event() == h11.Data(data=body[:1000])
    assert receiving.next_event() is h11.NEED_DATA
    assert passable(receiving) == len(body) - 1000 - 1


def test_nothing_passes_outside_a_body_or_in_a_chunk_s_framing():
    receiving = h11.Connection(h11.SERVER)
    assert passable(receiving) == 0  # no request yet
    receiving.receive_data(request_head("Transfer-Encoding: chunked") + b"5\r\nhello")
    assert isinstance(receiving.next_event(), h11.Request)
    assert receiving.next_event() == h11.Data(data=b"hello", chunk_start=True, chunk_end=True)
    assert receiving.next_event() is h11.NEED_DATA
    assert passable(receiving) == 0  # the chunk's CRLF is due
    receiving.receive_data(b"\r\n0\r\n")
    assert receiving.next_event() is h11.NEED_DATA
    assert passable(receiving) == 0  # in the trailer section


def test_a_body_that_ends_with_the_connection_never_passes():
    """A response framed by the close (HTTP/1.0, no length): h11 alone knows where it ends."""
    receiving = h11.Connection(h11.CLIENT)
    receiving.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    receiving.send(h11.EndOfMessage())
    receiving.receive_data(b"HTTP/1.0 200 OK\r\n\r\n")
    assert isinstance(receiving.next_event(), h11.Response)
    assert receiving.next_event() is h11.NEED_DATA
    assert passable(receiving) == 0


@pytest.mark.parametrize("last_byte_sent", [True, False])
def test_a_length_writer_counts_what_went_by_and_refuses_more_than_declared(last_byte_sent):
    sending = h11.Connection(h11.CLIENT)
    sending.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "10")]))
    assert framing(sending, 11) is None  # more than declared: nothing counted
    assert framing(sending, 9) == (b"", b"")
    if not last_byte_sent:
        with pytest.raises(h11.LocalProtocolError):
            sending.send(h11.EndOfMessage())  # one byte still owed
        return
    assert sending.send(h11.Data(data=b"z")) == b"z"
    sending.send(h11.EndOfMessage())
    assert sending.our_state is h11.DONE


def test_a_chunked_writer_frames_what_goes_by_as_one_chunk():
    sending = h11.Connection(h11.CLIENT)
    sending.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]))
    assert framing(sending, 0x1234) == (b"1234\r\n", b"\r\n")


def test_an_http_10_client_gets_the_body_as_it_comes():
    """h11 turns a chunked response into one ended by the close for an HTTP/1.0 client: no framing."""
    sending = h11.Connection(h11.SERVER)
    sending.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    sending.next_event()
    sending.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
    assert framing(sending, 100) == (b"", b"")


def test_no_framing_before_the_head_is_sent():
    assert framing(h11.Connection(h11.CLIENT), 10) is None


@given(
    body=st.binary(min_size=0, max_size=3000),
    chunk_sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=8),
    pieces=st.lists(st.integers(min_value=1, max_value=900), max_size=12),
    use_chunked=st.booleans(),
    pass_min=st.integers(min_value=1, max_value=400),
)
def test_relayed_with_passing_the_message_is_the_one_h11_alone_relays(body, chunk_sizes, pieces, use_chunked, pass_min):
    if use_chunked:
        message = request_head("Transfer-Encoding: chunked") + chunked(body, chunk_sizes) + TRAILING
    else:
        message = request_head(f"Content-Length: {len(body)}") + body + TRAILING
    wire, left, went_by = relay(message, pieces, pass_min)
    assert parsed_body(wire) == body
    assert left == TRAILING
    assert went_by < max(len(body), 1)
