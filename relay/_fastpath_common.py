"""What both fast-path implementations share.

Kept in one plain module so the Cython extension and its pure-Python twin
cannot drift apart on how a connection is said to have ended.
"""

import errno


def local_failure(error: int) -> str:
    """How a connection ended when the relay itself ran out of something, e.g. "relay-emfile"."""
    return "relay-" + errno.errorcode.get(error, "error").lower()
