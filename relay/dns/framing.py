"""DNS over TCP framing: each message preceded by its length in two bytes (RFC 1035 4.2.2, RFC 7766 8)."""

import struct

MAX_FRAME = 65535
MIN_FRAME = 12  # a DNS header: anything shorter means the stream is out of step or hostile
_LENGTH = struct.Struct("!H")


class FrameError(Exception):
    """The peer's byte stream cannot be DNS over TCP: close the connection."""


class Framer:
    """Splits one TCP connection's byte stream into messages. Holds at most one incomplete frame
    (MAX_FRAME + 2 bytes). After a FrameError every call raises it again."""

    def __init__(self):
        self._buffer = bytearray()
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[bytes]:
        """The messages ``data`` completes, in order; raises FrameError on a frame shorter than a DNS header."""
        if self._broken:
            raise FrameError("the stream already failed")
        self._buffer += data
        messages = []
        start = 0
        while len(self._buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, start)
            if length < MIN_FRAME:
                self._broken = True
                self._buffer.clear()
                raise FrameError(f"a {length}-byte frame cannot hold a DNS message")
            end = start + _LENGTH.size + length
            if end > len(self._buffer):
                break
            messages.append(bytes(self._buffer[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]  # once per call: many small frames in one read stay linear
        return messages


def frame(message: bytes) -> bytes:
    """``message`` with its length prefix; ValueError if it is longer than a frame can say (a bug of ours)."""
    if len(message) > MAX_FRAME:
        raise ValueError(f"a {len(message)}-byte DNS message cannot be framed")
    return _LENGTH.pack(len(message)) + message
