"""Early data through an HTTP proxy: which of a client's first bytes may go with the CONNECT request, and
the probe that finds out whether a proxy keeps such bytes for the tunnel (squid, tinyproxy) or drops them.

Only whole TLS handshake records go early (the ClientHello), never what follows them (TLS 1.3 0-RTT
application data, or anything not TLS): should the same bytes reach the destination on two connections
(a by-name attempt that answered after the by-address one raced past it, see relay.net.upstreams), a second
ClientHello on a connection then closed is what every Happy Eyeballs client does; a repeated request is not.

The probe (relay.net.early_data): a CONNECT to a TLS server (the health target) with a ClientHello of the
relay's own as early data. A TLS server never speaks first, so a TLS record after the 2xx (a ServerHello, or
an alert) proves the proxy passed the early bytes on; silence until the timeout, or a close, proves it did not.
"""

_TLS_HANDSHAKE = 0x16
_TLS_ALERT = 0x15
_RECORD_HEADER_SIZE = 5


def early_tls_records(first: bytes) -> bytes:
    """The whole TLS handshake records at the start of ``first`` (b"" if it does not start with one)."""
    end = 0
    while len(first) - end >= _RECORD_HEADER_SIZE and first[end] == _TLS_HANDSHAKE and first[end + 1] == 3:
        size = _RECORD_HEADER_SIZE + int.from_bytes(first[end + 3 : end + 5], "big")
        if len(first) - end < size:
            break
        end += size
    return first[:end]


def tls_answer(data: bytes) -> bool | None:
    """Whether ``data``, what came after the proxy's 2xx, starts like a TLS server's answer (a handshake
    record or an alert); None while fewer bytes than a record header's first three have come."""
    if len(data) < 3:
        return None if data == b"" or _could_start(data) else False
    return data[0] in (_TLS_HANDSHAKE, _TLS_ALERT) and data[1] == 3 and data[2] <= 4


def _could_start(data: bytes) -> bool:
    return data[0] in (_TLS_HANDSHAKE, _TLS_ALERT) and (len(data) < 2 or data[1] == 3)
