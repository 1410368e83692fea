"""The fast path and its pure twin: the API they share, original destination, transparent sockets, the selection.

The Engine, which relays connections, has its own tests in tests/test_fastpath_engine.py.
"""

import ast
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


def stub_api() -> tuple[dict, dict]:
    """What relay/_fastpath.pyi declares: {name: parameter names, or None for a constant or class} at the
    top, and {"Class.member": parameter names, or None for a property} in its classes."""
    declared, members = {}, {}
    for node in ast.parse((SOURCES / "_fastpath.pyi").read_text()).body:
        if isinstance(node, ast.AnnAssign) and not node.target.id.startswith("_"):
            declared[node.target.id] = None
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = [arg.arg for arg in node.args.args]
        elif isinstance(node, ast.ClassDef):
            declared[node.name] = None
            for member in node.body:
                if not member.name.startswith("_"):
                    is_property = any(getattr(d, "id", None) == "property" for d in member.decorator_list)
                    members[f"{node.name}.{member.name}"] = (
                        None if is_property else [arg.arg for arg in member.args.args]
                    )
    return declared, members


def test_both_twins_offer_the_api_of_the_stub(extension):
    declared, members = stub_api()
    classes = {name for name, parameters in declared.items() if parameters is None and name[0].isupper()}
    for twin in (extension, _fastpath_py):
        assert public_names(twin) == set(declared), twin.__name__
        for cls in ("Engine", "Conduit", "UdpEngine"):
            assert cls in classes
            offered = {f"{cls}.{name}" for name in public_names(getattr(twin, cls))}
            assert offered == {name for name in members if name.startswith(f"{cls}.")}, f"{twin.__name__}.{cls}"
        for name, parameters in [*declared.items(), *members.items()]:
            if parameters is not None:
                target = twin
                for part in name.split("."):
                    target = getattr(target, part)
                assert list(inspect.signature(target).parameters) == parameters, f"{twin.__name__}.{name}"


def test_both_twins_have_the_same_signatures_and_constants(extension):
    for name in public_names(extension):
        ours, theirs = getattr(extension, name), getattr(_fastpath_py, name)
        if inspect.isroutine(ours):
            assert inspect.signature(ours) == inspect.signature(theirs), name
    for cls in ("Engine", "Conduit"):
        for name in public_names(getattr(extension, cls)):
            ours, theirs = getattr(getattr(extension, cls), name), getattr(getattr(_fastpath_py, cls), name)
            if inspect.isroutine(ours):
                assert inspect.signature(ours) == inspect.signature(theirs), f"{cls}.{name}"
    assert extension.POOL_MAX == _fastpath_py.POOL_MAX
    assert (extension.NAME, _fastpath_py.NAME) == ("cython", "python")


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
