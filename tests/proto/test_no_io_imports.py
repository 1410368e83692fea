"""relay.proto must stay sans-IO: no module in it may import an I/O library."""

import ast
from pathlib import Path

import pytest

import relay.proto

FORBIDDEN_MODULES = {"trio", "socket", "asyncio", "selectors"}
PROTO_SOURCES = sorted(Path(relay.proto.__file__).parent.glob("*.py"))


def forbidden_imports(source: str) -> list[str]:
    """Top-level names of forbidden modules imported anywhere in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in FORBIDDEN_MODULES]
    return found


def test_the_checker_sees_every_import_form():
    source = (
        "import trio\n"
        "import os, socket as s\n"
        "from asyncio import sleep\n"
        "from selectors import DefaultSelector\n"
        "def f():\n"
        "    import trio.lowlevel\n"
        "import ipaddress, h11\n"
        "from . import errors\n"
    )
    assert forbidden_imports(source) == [
        "trio",
        "socket",
        "asyncio",
        "selectors",
        "trio.lowlevel",
    ]


def test_the_handshake_modules_are_checked():
    names = {path.name for path in PROTO_SOURCES}
    assert {"__init__.py", "errors.py", "handshake.py", "http_connect.py", "socks.py"} <= names


@pytest.mark.parametrize("path", PROTO_SOURCES, ids=lambda path: path.name)
def test_no_io_imports(path):
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []
