"""The fast path: ``from relay.fastpath import Engine``, whichever twin was chosen at import time.

The Cython extension is used when it is built, unless RELAY_NO_EXTENSIONS is
set (to anything but "" or "0"), which forces the pure-Python twin. Both
offer the API of relay/_fastpath.pyi.
"""

import os


def _forced_pure() -> bool:
    return os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0")


if _forced_pure():
    from relay import _fastpath_py as _twin

    WHY = "pure python, forced by RELAY_NO_EXTENSIONS"
else:
    try:
        from relay import _fastpath as _twin
    except ImportError:
        from relay import _fastpath_py as _twin

        WHY = "pure python, the extension is not built"
    else:
        WHY = "cython extension"

NAME = _twin.NAME
POOL_MAX = _twin.POOL_MAX
Engine = _twin.Engine
Conduit = _twin.Conduit
original_dst = _twin.original_dst
pooled_pipes = _twin.pooled_pipes
set_transparent = _twin.set_transparent
UDP_DROPS = _twin.UDP_DROPS
UdpEngine = _twin.UdpEngine
DnsHits = _twin.DnsHits
