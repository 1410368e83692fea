"""UDP over TPROXY, relayed through SOCKS5 UDP ASSOCIATE (RFC 1928 §7), issue 17.

Same split as relay.dns: ``datagram`` (the SOCKS5 UDP request header) and ``sessions`` (which client
datagram belongs to which session, the caps, idle expiry; an injected clock) are sans-IO; ``service``
is the Trio side: the transparent listeners, the control connections, the reply sockets.
"""
