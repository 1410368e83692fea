"""What both fast-path implementations share: step results and the error type.

Kept in one plain module so the Cython extension and its pure-Python twin
cannot drift apart on the values the pump compares against.
"""

import os

# Results of Flow.step(): why it stopped moving bytes.
WANT_READ = 1  # the source has nothing to read and nothing is buffered
WANT_WRITE = 2  # bytes are buffered and the destination cannot take them
EOF = 3  # the source sent FIN and every buffered byte was written
AGAIN = 4  # the byte budget is spent; yield to other tasks, then step again


class FlowError(Exception):
    """A socket error during Flow.step(), with the side it happened on.

    ``reading`` is true when the source failed (e.g. it sent a reset) and
    false when writing to the destination failed. ``moved`` is how many bytes
    the same step had written to the destination before the error: they were
    delivered, and count like those of a step that returns.
    """

    def __init__(self, errno: int, reading: bool, moved: int = 0):
        super().__init__(errno, os.strerror(errno))
        self.errno = errno
        self.reading = reading
        self.moved = moved

    def __str__(self) -> str:
        side = "reading" if self.reading else "writing"
        return f"{side}: {self.args[1]}"
