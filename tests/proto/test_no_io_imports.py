"""relay.proto and the sans-IO modules of relay.dns must stay so: none may import an I/O library."""

import ast
from pathlib import Path

import pytest

import relay.dns
import relay.proto
import relay.udp

FORBIDDEN_MODULES = {"trio", "socket", "ssl", "select", "asyncio", "selectors"}
DNS_SANS_IO = ["__init__.py", "message.py", "cache.py", "framing.py", "doh.py", "names.py", "split.py", "fakeip.py"]
UDP_SANS_IO = ["__init__.py", "datagram.py", "sessions.py"]
SANS_IO_SOURCES = (
    sorted(Path(relay.proto.__file__).parent.glob("*.py"))
    + [Path(relay.dns.__file__).parent / name for name in DNS_SANS_IO]
    + [Path(relay.udp.__file__).parent / name for name in UDP_SANS_IO]
)


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
        "import ssl, select\n"
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
        "ssl",
        "select",
        "trio.lowlevel",
    ]


def test_the_handshake_and_dns_modules_are_checked():
    names = {(path.parent.name, path.name) for path in SANS_IO_SOURCES if path.exists()}
    handshake = {
        ("proto", name) for name in ["__init__.py", "errors.py", "handshake.py", "http_connect.py", "socks.py"]
    }
    assert handshake | {("dns", name) for name in DNS_SANS_IO} <= names


@pytest.mark.parametrize("path", SANS_IO_SOURCES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_no_io_imports(path):
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []
