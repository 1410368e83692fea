"""Letting a forwarded body's bytes go by h11 unseen, so that the engine can splice them.

h11 parses heads and chunk framing, and counts what a body has left. Once a
head says how long the body (or the current chunk) is, those bytes need no
parsing: they may go from one socket to the other without entering Python,
and h11 on each side is told afterwards how many went. All but the last byte
of a length go by this way; h11 reads that one itself, which moves it on to
the chunk's end or the message's as if it had read them all.

h11 has no public API for this, so this module alone touches its reader and
writer objects, and only those of the types it knows: with any other (a
future h11, a body h11 reframes), nothing is passed and bytes go through
h11 as they always did.
"""

import h11

try:
    from h11._readers import ChunkedReader, ContentLengthReader
    from h11._writers import ChunkedWriter, ContentLengthWriter, Http10Writer
except ImportError:  # an h11 laid out otherwise: every byte goes through it
    ChunkedReader = ContentLengthReader = ChunkedWriter = ContentLengthWriter = Http10Writer = None


def passable(receiving: h11.Connection) -> int:
    """How many bytes of the body ``receiving`` is reading may go by unseen: all but the last
    byte of its length, or of the current chunk; 0 when none may, or while bytes it has read
    wait in its buffer (those go as events first: next_event() until NEED_DATA).
    """
    if receiving.their_state is not h11.SEND_BODY or len(receiving._receive_buffer):
        return 0
    reader = receiving._reader
    if ContentLengthReader is not None and type(reader) is ContentLengthReader:
        left = reader._remaining
    elif (
        ChunkedReader is not None
        and type(reader) is ChunkedReader
        and not reader._bytes_to_discard
        and not reader._reading_trailer
    ):
        left = reader._bytes_in_chunk
    else:
        return 0
    return max(left - 1, 0)


def passed(receiving: h11.Connection, count: int) -> None:
    """Tell ``receiving`` that ``count`` bytes of its body (at most passable()) went by."""
    reader = receiving._reader
    if type(reader) is ContentLengthReader:
        reader._remaining -= count
    else:
        reader._bytes_in_chunk -= count


def framing(sending: h11.Connection, count: int) -> tuple[bytes, bytes] | None:
    """What ``sending`` writes before and after ``count`` body bytes that go by it unseen, which
    it then counts as sent; None if it cannot let them go by (nothing is counted)."""
    if sending.our_state is not h11.SEND_BODY:
        return None
    writer = sending._writer
    if ContentLengthWriter is not None and type(writer) is ContentLengthWriter:
        if writer._length < count:
            return None
        writer._length -= count
        return b"", b""
    if ChunkedWriter is not None and type(writer) is ChunkedWriter:
        return b"%x\r\n" % count, b"\r\n"  # one chunk of exactly these bytes
    if Http10Writer is not None and type(writer) is Http10Writer:
        return b"", b""  # the body ends with the connection
    return None
