"""Connections to fake addresses (fake-ip mode): the name each one stands for, known at accept time.

A fake address means nothing beyond the relay, so a connection to one can only be opened by the name the pool
holds for it (relay.dns.fakeip), and at once: no need to wait for the client's first bytes to learn a name. A fake
address no name holds (given out before a restart that lost the store, recycled since, or never given) can go
nowhere: the connection is reset at once, so the client asks DNS again rather than wait for a timeout.
"""

import enum

from relay.addresses import format_address
from relay.logs import RateLimited

NAME_FROM = "fake-ip"  # the connection log line's name-from=
UNKNOWN_ENDED = "refused:unknown-fake-ip"


class Unknown(enum.Enum):
    """A fake address that no name holds."""

    UNKNOWN = "unknown"


UNKNOWN = Unknown.UNKNOWN


def fake_ip_name(fake_ips, address: str) -> str | None | Unknown:
    """For a connection to ``address``: the name to open it by (counted as a use, so the name keeps its address),
    None when ``address`` is not fake (or ``fake_ips`` is None: real mode), UNKNOWN when no name holds it."""
    if fake_ips is None or not fake_ips.is_fake(address):
        return None
    name = fake_ips.name_for(address)
    return UNKNOWN if name is None else name


def refuse_unknown(warnings: RateLimited, peer, dst) -> str:
    """Say (rate-limited, one kind for all clients) that a connection to a fake address no name holds is reset;
    the end to give it."""
    warnings.warning(
        "unknown-fake-ip",
        f"connection from {format_address(peer)} to {format_address(dst)} reset: no name holds that fake address "
        "(given out before the fake-ip store was lost, or recycled since); the client must ask DNS again",
    )
    return UNKNOWN_ENDED
