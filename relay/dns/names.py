"""Which name each client was given each address for: the DNS service's replies, remembered for connections.

A connection to an address the relay's DNS service gave its client can be opened by the name the client asked
for, at accept time, without waiting for the client's first bytes (relay.net.connection). Sans-IO: the caller
passes the wire reply and the time. Bounded by entries (least recently used goes first), and an entry lives as
long as the record's TTL says, within [MIN_LIFETIME, MAX_LIFETIME].
"""

import functools
from collections import OrderedDict

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype

from relay.addresses import plain_address
from relay.dns.message import PARSE_ERRORS, ReplyTemplate, read_response
from relay.dns.wire import ResponsePeek, peek_response
from relay.proto.sniff import valid_hostname

# Clients keep using an address a little past its TTL (a connection begun just before it ran out, a cache that
# rounds up): a short TTL still leaves the name known this long.
MIN_LIFETIME = 10.0
# A long TTL is kept no longer than this: the book is for connections that follow a lookup.
MAX_LIFETIME = 3600.0
# Each learn() drops at most this many expired entries, the least recently used first, and stops at one still
# alive: expired entries do not sit in the book until evicted (an entry at most MAX_LIFETIME past its last use),
# and no call walks the whole book.
SWEEP_STEP = 64
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


@functools.lru_cache(maxsize=4096)
def normalized(address: str) -> str:
    """``address`` as the book keys it: canonical text, an IPv4-mapped IPv6 address as its IPv4 address.
    ValueError if it is not an address. Cached: a connection asks for the same few addresses over and over."""
    return str(plain_address(address))


class NameBook:
    """(client, address) -> the name that client last asked for and was answered that address with."""

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # -> (name, expires)
        # Called with (client, name, address) when another name replaces ``name`` for that client and address.
        self.displaced = None

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, client: str, reply: bytes, now: float) -> None:
        """Remember the addresses of ``reply`` (a wire DNS response sent to ``client``) under the name it answers.
        A reply that cannot be read, or names nothing a proxy may be asked for, is ignored."""
        try:
            answered = _answered(reply)
        except PARSE_ERRORS:
            answered = None
        self._remember(client, answered, lambda ttl: ttl, now)

    def learn_template(self, client: str, template: ReplyTemplate, ttl_of, now: float) -> None:
        """As ``learn`` for ``template`` rendered with ``ttl_of`` (message.ReplyTemplate), which is read once."""
        if template.names is None:
            try:
                template.names = _answered(template.wire) or ()
            except PARSE_ERRORS:
                template.names = ()
        self._remember(client, template.names or None, ttl_of, now)

    def _remember(self, client: str, answered, ttl_of, now: float) -> None:
        try:
            client = normalized(client)
        except ValueError:  # a client that is no address
            return
        self._sweep(now)
        if answered is None:
            return
        name, addresses = answered
        for address, ttl in addresses:
            key = (client, address)
            before = self._entries.get(key)
            self._entries[key] = (name, now + min(max(ttl_of(ttl), MIN_LIFETIME), MAX_LIFETIME))
            self._entries.move_to_end(key)
            if before is not None and before[0] != name and self.displaced is not None:
                self.displaced(client, before[0], address)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def name_for(self, client: str, address: str, now: float) -> str | None:
        """The name ``client`` was last given ``address`` for, unless that has expired."""
        try:
            key = (normalized(client), normalized(address))
        except ValueError:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        name, expires = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return name

    def _sweep(self, now: float) -> None:
        entries = self._entries
        for _ in range(SWEEP_STEP):
            oldest = next(iter(entries), None)
            if oldest is None or now < entries[oldest][1]:
                return
            del entries[oldest]


def _answered(reply: bytes) -> tuple[str, list[tuple[str, int]]] | None:
    """(the name asked, [(address, TTL)] of every A and AAAA record reached from it through CNAMEs), or None when
    ``reply`` answers no such name with addresses. Raises one of PARSE_ERRORS if it is not a DNS message."""
    peeked = peek_response(reply)
    if peeked is not None:
        return peeked_answered(peeked)
    return parsed_answered(read_response(reply))


def parsed_answered(message: dns.message.Message) -> tuple[str, list[tuple[str, int]]] | None:
    """_answered for a reply dnspython parsed."""
    if not message.flags & dns.flags.QR or len(message.question) != 1:
        return None
    question = message.question[0]
    name = valid_hostname(question.name.to_text())
    if name is None or question.rdclass != dns.rdataclass.IN:
        return None
    # The chain from the name asked: a CNAME's target is an alias of it only if its owner is one already.
    aliases = {question.name}
    cnames = {rrset.name: rrset for rrset in message.answer if rrset.rdtype == dns.rdatatype.CNAME}
    owner = question.name
    while owner in cnames:
        owner = cnames[owner][0].target
        if owner in aliases:  # a loop: no address at its end
            break
        aliases.add(owner)
    addresses = [
        (normalized(rdata.address), rrset.ttl)
        for rrset in message.answer
        if rrset.rdtype in ADDRESS_TYPES and rrset.rdclass == dns.rdataclass.IN and rrset.name in aliases
        for rdata in rrset
    ]
    return (name, addresses) if addresses else None


def peeked_answered(peeked: ResponsePeek) -> tuple[str, list[tuple[str, int]]] | None:
    """_answered for a reply of the usual shape (relay.dns.wire.peek_response), read as parsed_answered reads it."""
    name = valid_hostname(peeked.question)
    if name is None or peeked.key[2] != dns.rdataclass.IN:
        return None
    owner = peeked.qname.lower()
    aliases = {owner}
    cnames = {record.owner: record.value for record in peeked.answer if record.rdtype == dns.rdatatype.CNAME}
    while owner in cnames:
        owner = cnames[owner]
        if owner in aliases:
            break
        aliases.add(owner)
    addresses = [
        (normalized(record.value), record.ttl)
        for record in peeked.answer
        if record.rdtype in ADDRESS_TYPES and record.owner in aliases
    ]
    return (name, addresses) if addresses else None
