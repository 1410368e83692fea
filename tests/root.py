"""Tests that need root (network namespaces, iptables, daemons) skip without it, except in CI."""

import os

import pytest


def require_root(reason: str = "needs root (network namespaces, iptables)") -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this must not be skipped")
    pytest.skip(reason)
