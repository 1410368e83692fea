"""What both fast-path implementations share: step results and the error type.

Kept in one plain module so the Cython extension and its pure-Python twin
cannot drift apart on the values the pump compares against.
"""

import errno
import os

# Results of Flow.step(): why it stopped moving bytes.
WANT_READ = 1  # the source has nothing to read and nothing is buffered
WANT_WRITE = 2  # bytes are buffered and the destination cannot take them
EOF = 3  # the source sent FIN and every buffered byte was written
AGAIN = 4  # the byte budget is spent; yield to other tasks, then step again


class FlowError(Exception):
    """A socket error during Flow.step(), with the side it happened on.

    ``reading`` is true when the source failed (e.g. it sent a reset) and
    false when writing to the destination failed.
    """

    def __init__(self, errno: int, reading: bool):
        super().__init__(errno, os.strerror(errno))
        self.errno = errno
        self.reading = reading

    def __str__(self) -> str:
        side = "reading" if self.reading else "writing"
        return f"{side}: {self.args[1]}"


def local_failure(error: int) -> str:
    """How a connection ended when the relay itself ran out of something, e.g. "relay-emfile"."""
    return "relay-" + errno.errorcode.get(error, "error").lower()
