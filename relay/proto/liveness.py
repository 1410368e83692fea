"""What to send a proxy to learn whether a program still answers on its port (the probe behind
--confirm-eof), and to check its health.

A connection alone proves little: when a proxy is killed, the kernel closes
its fds in no set order, so its tunnels can end (with FINs) while its
listening socket still completes handshakes for a moment. A connection
accepted by that dying listener is reset before anyone reads it, so the
probe sends a request the proxy answers by itself, without opening anything:
any answer, even a plain close, comes from a live program.
"""

# An origin-form request without a Host: no destination, so HTTP proxies answer it
# themselves (squid, privoxy, tinyproxy: 400).
_HTTP = b"GET / HTTP/1.0\r\n\r\n"
# A SOCKS5 greeting offering no authentication: the server answers with its choice.
# SOCKS4 servers get it too (dante and ssh -D speak both); one that speaks only 4
# waits for more or closes, and neither is a reset.
_SOCKS = b"\x05\x01\x00"

LIVENESS_REQUESTS = {"http": _HTTP, "socks4": _SOCKS, "socks4a": _SOCKS, "socks5": _SOCKS}

# An active health check asks the same question and reads the answer before it closes, so the
# proxy logs a whole exchange (squid logs a bare connect as error:transaction-end-before-headers):
# (question, answer bytes to read; None: until the proxy closes, as an HTTP proxy does after its
# answer to HTTP/1.0). SOCKS4 has no question a server answers without connecting anywhere, and
# one that speaks only 4 would wait for more than the SOCKS5 greeting: a connect is the check.
HEALTH_QUESTIONS = {"http": (_HTTP, None), "socks5": (_SOCKS, 2)}
