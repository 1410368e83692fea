"""Selects the fast-path implementation once, at import time.

The Cython extension is used when it is built, unless RELAY_NO_EXTENSIONS is
set (to anything but "" or "0"), which forces the pure-Python twin.
"""

import os

from relay import _fastpath_py


def _forced_pure() -> bool:
    return os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0")


if _forced_pure():
    impl = _fastpath_py
    WHY = "pure python, forced by RELAY_NO_EXTENSIONS"
else:
    try:
        from relay import _fastpath as impl
    except ImportError:
        impl = _fastpath_py
        WHY = "pure python, the extension is not built"
    else:
        WHY = "cython extension"

NAME = impl.NAME
