"""UDP over TPROXY, relayed through SOCKS5 UDP ASSOCIATE (RFC 1928 §7), issue 17.

Same split as relay.dns: ``datagram`` (the SOCKS5 UDP request header) and ``sessions`` (which client
datagram belongs to which session, the caps, idle expiry; an injected clock) are sans-IO; ``service``
is the Trio side: the transparent listeners, the associations and their control connections, each
session's life. The datagrams themselves go through the fast path's UdpEngine (relay.fastpath).
"""
