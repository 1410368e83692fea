"""Dropping root after binding, keeping only CAP_NET_ADMIN (SO_MARK on each upstream socket)."""

import ctypes
import os
import pwd

from relay.config import ConfigError

CAP_NET_ADMIN = 12
PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise ConfigError(f"--user: {what} failed: {os.strerror(errno)}")


def drop_to(user: str) -> None:
    """Become ``user`` (and its primary group, no supplementary groups) with CAP_NET_ADMIN only."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user: no such user {user!r}") from None
    if os.geteuid() != 0:
        raise ConfigError("--user needs the relay to start as root")
    libc = _libc()
    # Keep the permitted set across setuid, then narrow it to the one capability we need.
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_NET_ADMIN
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
