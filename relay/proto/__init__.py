"""Sans-IO proxy handshakes: bytes in, events out.

Nothing in this package touches a socket or an event loop, so every state
machine can be driven by the Trio code in ``relay.net`` and by tests alike.
"""

from relay.proto.errors import (
    LocalProtocolError,
    ProtocolError,
    ProxyRefused,
    RemoteProtocolError,
)
from relay.proto.http_connect import HttpConnectClient
from relay.proto.socks import Socks4Client, Socks5Client

__all__ = [
    "HttpConnectClient",
    "LocalProtocolError",
    "ProtocolError",
    "ProxyRefused",
    "RemoteProtocolError",
    "Socks4Client",
    "Socks5Client",
]
