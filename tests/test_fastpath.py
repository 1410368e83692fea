"""The fast path and its pure twin: original destination, transparent sockets, the selection.

The Engine, which relays connections, has its own tests in tests/test_fastpath_engine.py.
"""

import errno
import importlib
import inspect
import os
import socket
from pathlib import Path

import pytest

import relay
from relay import _fastpath_py, ends, fastpath
from tests.sockpairs import tcp_pair

SOURCES = Path(relay.__file__).parent


def public_names(namespace) -> set[str]:
    """What a module or class offers: its names without a leading underscore, imported modules left out."""
    return {name for name, value in vars(namespace).items() if not name.startswith("_") and not inspect.ismodule(value)}


def test_both_twins_offer_the_same_api(impl):
    for name in ("NAME", "Engine", "original_dst", "set_transparent", "pooled_pipes"):
        assert hasattr(impl, name)


def test_neither_twin_spells_an_end_word():
    """relay.ends is the one place the words are written: the twins cannot drift apart on them."""
    words = [value for name, value in vars(ends).items() if name.isupper() and isinstance(value, str)]
    for source in ("_fastpath.pyx", "_fastpath_py.py"):
        text = (SOURCES / source).read_text()
        assert [word for word in words if f'"{word}"' in text] == [], source


def test_fastpath_offers_the_selected_twin():
    forced = os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0")
    if forced:
        assert fastpath.NAME == "python"
    twin = _fastpath_py if fastpath.NAME == "python" else importlib.import_module("relay._fastpath")
    for name in public_names(twin):
        assert getattr(fastpath, name) is getattr(twin, name), name


def test_original_dst_without_nat_is_an_error(impl):
    """A connection that was not NATed has no original destination: both twins say ENOENT."""
    a, b = tcp_pair()
    with a, b:
        with pytest.raises(OSError) as caught:
            impl.original_dst(b)
        assert caught.value.errno == errno.ENOENT


def test_set_transparent(impl):
    with socket.socket() as sock:
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                impl.set_transparent(sock)
        else:
            impl.set_transparent(sock)
            assert sock.getsockopt(socket.IPPROTO_IP, 19) == 1  # IP_TRANSPARENT
    with socket.socket(socket.AF_INET6) as sock6:
        if os.geteuid() == 0:
            impl.set_transparent(sock6)
            assert sock6.getsockopt(socket.IPPROTO_IPV6, 75) == 1  # IPV6_TRANSPARENT
