"""Why a tunnel could not be opened, and whose fault that was.

Whose fault decides what happens next: a proxy's fault counts against its
health and the next upstream is tried; the target's (the proxy answered,
but refused the destination or could not reach it) ends the connection, or,
asked by name, is retried once by address; the relay's own shortage (out of
fds, ports, memory) or shutdown never marks a proxy down. The short
``reason`` words are what logs and metrics show.
"""

import enum
import errno
import os

from relay import ends
from relay.ends import errno_word, local_failure
from relay.proto.errors import ProxyRefused, RemoteProtocolError
from relay.proto.tls import TlsFailure


class Fault(enum.Enum):
    PROXY = "proxy"  # unreachable, silent, garbled, or refusing our credentials
    TARGET = "target"  # the proxy answered: it cannot or will not reach the destination
    RELAY = "relay"  # this process: out of something, shutting down, or a bug
    CLIENT = "client"  # the LAN client: reset, vanished, or sent what cannot be relayed


# Out of local ports, fds or memory is the relay's shortage, not the proxy's fault: it must
# not mark a healthy upstream down (and so refuse everyone once ports free up).
LOCAL_SHORTAGES = frozenset({errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Refusals that say the proxy will not serve us at all, whatever the destination.
PROXY_REFUSALS = frozenset({"http-407", "socks5-auth-failed", "socks5-no-acceptable-method"})


class UpstreamError(Exception):
    """The tunnel could not be opened: ``reason`` (one short word), whose ``fault``,
    ``retry_by_address``: asked for a hostname, asking by IP may still work, and ``refused``:
    the proxy answered the request with a refusal."""

    def __init__(self, message: str, reason: str, fault: Fault, retry_by_address: bool = False, refused: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fault = fault
        self.retry_by_address = retry_by_address
        self.refused = refused

    @property
    def proxy_fault(self) -> bool:
        """This counts against the proxy's health, and the next upstream is tried."""
        return self.fault is Fault.PROXY


def cancelled() -> UpstreamError:
    return UpstreamError("the relay is shutting down", ends.CANCELLED, Fault.RELAY)


def internal_error() -> UpstreamError:
    return UpstreamError("internal error", "internal-error", Fault.RELAY)


def cannot_watch(exc: OSError) -> UpstreamError:
    """epoll could not take the socket (its watch limit, memory): the relay's shortage."""
    return UpstreamError(f"cannot wait for the upstream socket: {exc.strerror}", local_failure(exc.errno), Fault.RELAY)


def connect_failure(error: OSError, where: str, *, direct: bool = False) -> UpstreamError:
    """What a failed connect() (or socket()) means: the proxy's fault (the target's when there is
    no proxy: ``direct``), or the relay's own shortage."""
    why = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in LOCAL_SHORTAGES:
        return UpstreamError(f"connecting to {where} failed: {why}", local_failure(error.errno), Fault.RELAY)
    fault = Fault.TARGET if direct else Fault.PROXY
    return UpstreamError(f"connecting to {where} failed: {why}", "connect-" + errno_word(error.errno), fault)


def connect_timed_out(where: str, timeout: float, *, direct: bool = False) -> UpstreamError:
    fault = Fault.TARGET if direct else Fault.PROXY
    return UpstreamError(f"connecting to {where} timed out after {timeout:g} s", "connect-timeout", fault)


def handshake_timed_out(timeout: float) -> UpstreamError:
    return UpstreamError(f"proxy handshake timed out after {timeout:g} s", "handshake-timeout", Fault.PROXY)


def closed_in_handshake() -> UpstreamError:
    # e.g. ssh -D closes without a SOCKS reply when the far side cannot connect: about the target.
    return UpstreamError(
        "the proxy closed the connection during the handshake", "proxy-closed", Fault.TARGET, retry_by_address=True
    )


def closed_in_tls_handshake() -> UpstreamError:
    # "proxy-closed": a pre-opened connection that went stale is dialed again (relay.net.dial.STALE_POOLED).
    return UpstreamError("the proxy closed the connection during the TLS handshake", "proxy-closed", Fault.PROXY)


def handshake_failure(exc: Exception) -> UpstreamError:
    """The UpstreamError for what ended a proxy handshake: a refusal, garbage, a socket error."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TlsFailure):  # the proxy's certificate, or TLS itself: never the destination's
        return UpstreamError(str(exc), exc.reason, Fault.PROXY)
    if isinstance(exc, ProxyRefused):
        fault = Fault.PROXY if exc.reason in PROXY_REFUSALS else Fault.TARGET
        return UpstreamError(str(exc), exc.reason, fault, _retry_by_address(exc), refused=True)
    if isinstance(exc, RemoteProtocolError):
        return UpstreamError(f"malformed reply from the proxy: {exc}", "proxy-protocol-error", Fault.PROXY)
    return UpstreamError(f"proxy connection failed: {exc.strerror}", "proxy-" + errno_word(exc.errno), Fault.PROXY)


def _retry_by_address(refusal: ProxyRefused) -> bool:
    """Only a refusal that says the name could not be reached: not 403 (the proxy's rules) nor 407."""
    return refusal.host_unreachable or refusal.reason == "socks5-general-failure"
