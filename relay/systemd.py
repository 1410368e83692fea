"""sd_notify(3) without libsystemd: readiness, reloads and stopping, for Type=notify units."""

import os
import socket


def notify(state: str) -> None:
    """Send ``state`` (e.g. "READY=1") to systemd, if it is listening; otherwise do nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            pass  # systemd went away; nothing we can do about it
