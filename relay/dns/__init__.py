"""The DNS service of issue 14: answers clients on the LAN, resolves through the tunnel, caches.

Same split as relay.proto / relay.net: ``message``, ``cache`` and ``framing`` are sans-IO (bytes in, bytes out,
an injected clock; no trio or sockets), so they are tested exhaustively without a network. The modules that
listen and resolve are Trio.
"""
