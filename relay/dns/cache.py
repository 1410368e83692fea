"""The DNS cache: responses by question, aged on the way out, served stale when upstreams fail (RFC 2308, 8767).

Bounded by entries (least recently used goes first) and by entry size; the clock is injected.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from relay.dns.message import PARSE_ERRORS, ReplyTemplate, ttl_of, with_ttls
from relay.dns.wire import Key, Peek

STALE_TTL = 30  # RFC 8767 4: the TTL of stale records, so clients come back soon for fresh ones
MAX_RESPONSE = 65535  # larger only via TCP/DoH, and a DNS message cannot be larger anyway


@dataclass
class _Entry:
    response: bytes
    stored_at: float
    lifetime: float  # the response's TTL clamped to [min_ttl, max_ttl]
    templates: dict[bool, ReplyTemplate | None] = field(default_factory=dict)  # by whether the client has EDNS

    @property
    def expires(self) -> float:
        return self.stored_at + self.lifetime


class Cache:
    def __init__(
        self,
        max_entries: int,
        min_ttl: float,
        max_ttl: float,
        stale_for: float = 86400,
        clock=time.monotonic,
    ):
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.stale_for = stale_for
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.dropped = None  # called with each key whose answer is dropped or replaced (relay.dns.service's DnsHits)

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        """This cache's clock: the times of times() and of the TTLs' ageing."""
        return self._clock()

    def _drop(self, key: Key) -> None:
        del self._entries[key]
        if self.dropped is not None:
            self.dropped(key)

    def get(self, key: Key) -> tuple[bytes, bool] | None:
        """(the response with every TTL lowered to the time left, True) while fresh; (with STALE_TTL, False) for
        ``stale_for`` seconds after it expired; None after that or when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        fresh = now < entry.expires
        if not fresh and now >= entry.expires + self.stale_for:
            self._drop(key)
            return None
        elapsed = max(0.0, now - entry.stored_at)

        def aged_ttl(ttl: int) -> int:
            return _aged(ttl, entry.lifetime, elapsed) if fresh else STALE_TTL

        try:
            aged = with_ttls(entry.response, aged_ttl)
        except PARSE_ERRORS:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return aged, fresh

    def hit(self, peek: Peek) -> tuple[ReplyTemplate, object] | None:
        """For the hot path: the template of the fresh answer to ``peek`` and the TTL function to render it with
        (what ``get`` and ``message.reply_for`` would make of it, byte for byte); None when there is none."""
        return self.template(peek.key, peek.edns)

    def template(self, key: Key, edns: bool) -> tuple[ReplyTemplate, object] | None:
        """``hit`` for a question asked with EDNS or without."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        elapsed = self._clock() - entry.stored_at
        if not 0 <= elapsed < entry.lifetime:
            return None  # stale: the slow path decides whether to serve it
        template = entry.templates.get(edns, False)
        if template is False:
            template = entry.templates[edns] = ReplyTemplate.build(key, entry.response, edns)
        if template is None:
            return None
        self._entries.move_to_end(key)
        lifetime = entry.lifetime
        return template, lambda ttl: _aged(ttl, lifetime, elapsed)

    def times(self, key: Key) -> tuple[float, float] | None:
        """(when the answer to ``key`` was stored, how long it is fresh), on this cache's clock; None if absent."""
        entry = self._entries.get(key)
        return None if entry is None else (entry.stored_at, entry.lifetime)

    def put(self, key: Key, response: bytes) -> None:
        """Keep ``response`` for its TTL (message.ttl_of) clamped to [min_ttl, max_ttl]; nothing when it may not be
        cached, is too large, or its clamped TTL is 0."""
        if self.max_entries <= 0 or len(response) > MAX_RESPONSE:
            return
        ttl = ttl_of(response)
        if ttl is None:
            return
        lifetime = min(max(ttl, self.min_ttl), self.max_ttl)
        if lifetime <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(response, self._clock(), lifetime)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))


def _aged(ttl: int, lifetime: float, elapsed: float) -> int:
    """Never promise a client more than we keep it ourselves: at most the time left, rounded down."""
    return int(max(0, min(ttl, lifetime) - elapsed))
