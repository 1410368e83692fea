"""How a relayed connection ended: the word in its log line and its metric label.

Dashboards and alerts match these words, so none may change. Both fast-path
twins end connections with them; the pump adds UPSTREAM_DOWN.
"""

import errno

CLOSED = "closed"  # both directions finished with a FIN
CLIENT_RESET = "client-reset"
UPSTREAM_RESET = "upstream-reset"
RESET_BY = (CLIENT_RESET, UPSTREAM_RESET)  # indexed by the engine's side: 0 the client, 1 the upstream
IDLE_TIMEOUT = "idle-timeout"
HALF_CLOSED_TIMEOUT = "half-closed-timeout"  # one direction finished, the other went silent
# https:// upstreams: an alert or a record that does not decrypt, or a FIN in the middle of a record (the client is
# reset: its data is damaged or cut).
UPSTREAM_TLS_ERROR = "upstream-tls-error"
UPSTREAM_TLS_TRUNCATED = "upstream-tls-truncated"
UPSTREAM_DOWN = "upstream-down"  # --confirm-eof: the upstream's FIN came from a proxy that died
CLIENT_PROTOCOL_ERROR = "client-protocol-error"  # plain HTTP forwarded: the client's request was malformed
CLIENT_CLOSED_MID_REQUEST = "client-closed-mid-request"  # plain HTTP forwarded: the client left before its answer
# Plain HTTP forwarded: an upgrade (or CONNECT) after the connection's first request, which cannot become a tunnel.
CLIENT_UPGRADE_AFTER_REQUESTS = "client-upgrade-after-requests"
PROXY_CLOSED = "proxy-closed"  # plain HTTP forwarded: the proxy closed before its answer was complete
PROXY_PROTOCOL_ERROR = "proxy-protocol-error"  # plain HTTP forwarded: the proxy's answer was malformed
# --engine sockmap: a reader fell too far behind (the kernel would have queued without bound), or the
# upstream spoke while the connection was being handed to the kernel (the order of its bytes was lost).
BACKLOG_FULL = "relay-backlog-full"
STORE_RACE = "relay-store-race"
CANCELLED = "cancelled"  # the relay shut down
RECLAIMED = "reclaimed"  # every slot was taken: its client had not sent a byte, and a new one waited
ERROR = "error"  # a bug of the relay's, logged with its traceback


def errno_word(code: int | None) -> str:
    """The short word for an errno in logs and metric labels: "econnrefused"; "error" if unknown."""
    return errno.errorcode.get(code, "error").lower() if code else "error"


def local_failure(code: int | None) -> str:
    """How a connection ended when the relay itself ran out of something, e.g. "relay-emfile"."""
    return "relay-" + errno_word(code)


def client_failure(code: int | None) -> str:
    """How a connection ended when its client's socket failed, e.g. "client-econnreset"."""
    return "client-" + errno_word(code)
