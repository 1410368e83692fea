"""Errors shared by the handshake state machines.

As in h11, what *we* did wrong and what the *peer* did wrong are separate
types: the first is a bug or a request the protocol cannot express, the second
is a proxy that answered with garbage or refused.
"""


class ProtocolError(Exception):
    """Base class for every error raised by ``relay.proto``."""


class LocalProtocolError(ProtocolError):
    """We asked for something the protocol cannot carry (e.g. IPv6 over SOCKS4)."""


class RemoteProtocolError(ProtocolError):
    """The proxy sent something malformed, oversized or unexpected."""


class ProxyRefused(RemoteProtocolError):
    """The proxy answered well-formed, but said no.

    ``reason`` is a short machine-friendly word for logs and metrics
    (``"http-403"``, ``"socks5-host-unreachable"``...); ``host_unreachable`` is
    true when the refusal is about resolving/reaching the target rather than
    about us, which lets callers retry by address.
    """

    def __init__(self, message: str, reason: str, host_unreachable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.host_unreachable = host_unreachable
