"""Fake-IP mode, sans-IO: each name asked gets an address from the fake ranges, and each address gives its name back.

A connection to a fake address is then opened by the name (relay.net.fake_ips), whatever the client sent, so the
LAN's resolver never decides where a name goes and no real address is looked up until the far side connects.

Each family (A: the IPv4 ranges, AAAA: the IPv6 ones) numbers its usable addresses 0, 1, ... across its ranges in
order, and hands them out lowest first. A name keeps its address while it is used (asked for, or connected to);
when the family is full, the address of the name used longest ago is given to the new name. Bounded by the ranges'
size and MAX_NAMES_PER_FAMILY. ``dump`` and ``load`` give and take the store's bytes (relay.dns.fakeip_store
writes them); a store that cannot be read whole raises CorruptStore.
"""

import bisect
import ipaddress
import zlib
from collections import OrderedDict

import dns.rdataclass
import dns.rdatatype

from relay.addresses import plain_address
from relay.dns import message
from relay.proto.sniff import valid_hostname

ANSWER_TTL = 1  # clients ask again at once, so a name keeps being used (and kept) while they connect to it
# A household sees a few thousand names a day: a name is recycled after this many newer ones.
MAX_NAMES_PER_FAMILY = 32768
# HTTPS and SVCB records carry real addresses (ipv4hint, ipv6hint) that clients would connect to instead.
NO_DATA_TYPES = (dns.rdatatype.HTTPS, dns.rdatatype.SVCB)
ADDRESS_TYPES = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}

STORE_HEADER = b"relay fake-ips 1\n"  # then zlib: one "ADDRESS NAME" line per name, used longest ago first
_LONGEST_LINE = len("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") + 1 + 253 + 1
MAX_STORE_TEXT = 2 * MAX_NAMES_PER_FAMILY * _LONGEST_LINE
# zlib's compressBound(): what it adds at worst to what it cannot compress.
MAX_STORE_BYTES = len(STORE_HEADER) + MAX_STORE_TEXT + (MAX_STORE_TEXT >> 12) + (MAX_STORE_TEXT >> 14) + 13


class CorruptStore(Exception):
    """The store's bytes are not a whole store this pool can take; the message says what is wrong."""


class _Family:
    """The fake addresses of one family, numbered across its ranges; which name holds which."""

    def __init__(self, networks: list, max_names: int):
        self.networks = networks
        self.firsts = []  # the number of each range's first usable address
        usable = 0
        for network in networks:
            self.firsts.append(usable)
            usable += network.num_addresses - 2  # not the network's first and last address
        self.capacity = min(usable, max_names)
        self.by_name: OrderedDict[str, int] = OrderedDict()  # used longest ago first
        self.by_number: dict[int, str] = {}
        self.never_used = 0  # every number below it is held, or in `freed`
        self.freed: list[int] = []  # numbers below never_used that no name holds (after a load), highest first
        self.recycled = 0

    def address_of(self, name: str) -> tuple[str, bool]:
        """(the address ``name`` holds, given to it now if it held none; whether that was so)."""
        number = self.by_name.get(name)
        if number is not None:
            self.by_name.move_to_end(name)
            return self.address(number), False
        if self.freed:
            number = self.freed.pop()
        elif self.never_used < self.capacity:
            number = self.never_used
            self.never_used += 1
        else:
            _, number = self.by_name.popitem(last=False)
            self.recycled += 1
        self.hold(name, number)
        return self.address(number), True

    def hold(self, name: str, number: int) -> None:
        self.by_name[name] = number
        self.by_number[number] = name

    def name_of(self, address) -> str | None:
        name = self.by_number.get(self.number(address))
        if name is not None:
            self.by_name.move_to_end(name)
        return name

    def address(self, number: int) -> str:
        which = bisect.bisect_right(self.firsts, number) - 1
        network = self.networks[which]
        return str(network.network_address + 1 + number - self.firsts[which])

    def number(self, address) -> int | None:
        """The number of a usable fake address (an ip_address of this family); None for any other address."""
        for network, first in zip(self.networks, self.firsts):
            if address in network:
                offset = int(address) - int(network.network_address) - 1
                if 0 <= offset < network.num_addresses - 2 and first + offset < self.capacity:
                    return first + offset
        return None

    def __len__(self) -> int:
        return len(self.by_name)


class FakeIps:
    """The fake-IP pool and the DNS answers it gives (see the module's docstring)."""

    def __init__(self, networks: list, excluded: list[str], max_names: int = MAX_NAMES_PER_FAMILY):
        self.networks, self.max_names = list(networks), max_names
        self.excluded = excluded  # name suffixes answered as in real mode; a reload may replace them
        self.families = self.empty_families()
        self.changes = 0  # names given an address since the last dump: the store is written only after one

    def empty_families(self) -> dict[int, _Family]:
        by_version: dict[int, list] = {}
        for network in self.networks:
            by_version.setdefault(network.version, []).append(network)
        return {version: _Family(networks, self.max_names) for version, networks in by_version.items()}

    # -- DNS -------------------------------------------------------------------------------------------------------

    def answer(self, query: message.Query, may_add=lambda: True) -> tuple[str, bytes | None] | None:
        """(the metric's outcome, the reply) for a query fake-ip mode answers itself; None: resolve it as usual.
        A name that holds no address yet gets one only if ``may_add()`` says so, else ("dropped", None): new
        names recycle the addresses others hold, so a flood of them is limited like questions upstream."""
        hostname = self.takes(query.key)
        if hostname is None:
            return None
        rdtype = query.key[1]
        family = self.families.get(ADDRESS_TYPES.get(rdtype))
        if family is None:  # HTTPS/SVCB, or no fake range of this family: no address at all, rather than a real one
            return "no-data", message.no_data(query)
        if hostname not in family.by_name and not may_add():
            return "dropped", None
        address, new = family.address_of(hostname)
        self.changes += new
        return "fake-ip", message.address_reply(query, address, ANSWER_TTL)

    def takes(self, key: message.Key) -> str | None:
        """The hostname of a question this mode answers itself; None for those it resolves as usual."""
        name, rdtype, rdclass = key
        if rdclass != dns.rdataclass.IN or (rdtype not in ADDRESS_TYPES and rdtype not in NO_DATA_TYPES):
            return None
        hostname = fakeable(name)
        return None if hostname is None or self.is_excluded(hostname) else hostname

    def is_excluded(self, hostname: str) -> bool:
        return any(hostname == suffix or hostname.endswith("." + suffix) for suffix in self.excluded)

    # -- connections ----------------------------------------------------------------------------------------------

    def is_fake(self, address: str) -> bool:
        """Whether ``address`` lies in a fake range (held by a name or not)."""
        parsed = plain_address(address)
        return any(parsed in network for network in self.networks)

    def name_for(self, address: str) -> str | None:
        """The name holding ``address``, now counted as used; None if none does."""
        parsed = plain_address(address)
        family = self.families.get(parsed.version)
        return family.name_of(parsed) if family is not None else None

    def in_use(self) -> dict[int, int]:
        """Names holding an address, by IP version."""
        return {version: len(family) for version, family in self.families.items()}

    def recycled(self) -> int:
        """Addresses taken from the name used longest ago, since start."""
        return sum(family.recycled for family in self.families.values())

    # -- the store -------------------------------------------------------------------------------------------------

    def dump(self) -> bytes:
        return encode(self.snapshot())

    def snapshot(self) -> list:
        """What the store will hold, copied so that ``encode`` may run in another thread while the pool changes."""
        self.changes = 0
        return [(family, list(family.by_name.items())) for family in self.families.values()]

    def load(self, data: bytes) -> int:
        """Replace the pool with the store in ``data``; how many names were left out, their address no longer in a
        fake range (the ranges changed). CorruptStore, and the pool left empty, if ``data`` is not a whole store."""
        self.families = self.empty_families()  # what stays if read_store raises
        self.changes = 0
        self.families, left_out = self.read_store(data)
        return left_out

    def read_store(self, data: bytes) -> tuple[dict[int, _Family], int]:
        if not data.startswith(STORE_HEADER):
            raise CorruptStore("it does not begin as a fake-ip store")
        if len(data) > MAX_STORE_BYTES:
            raise CorruptStore(f"it is larger than a store can be ({MAX_STORE_BYTES} bytes)")
        unpacker = zlib.decompressobj()
        try:
            text = unpacker.decompress(data[len(STORE_HEADER) :], MAX_STORE_TEXT + 1)
        except zlib.error:
            raise CorruptStore("its compressed data is damaged") from None
        if not unpacker.eof or unpacker.unused_data or len(text) > MAX_STORE_TEXT or text[-1:] not in (b"", b"\n"):
            raise CorruptStore("it is truncated, or has more than a store holds")
        families, left_out = self.empty_families(), 0
        for line in text.split(b"\n")[:-1]:
            address_text, _, name_text = line.decode("ascii", "replace").partition(" ")
            name = fakeable(name_text)
            try:
                address = ipaddress.ip_address(address_text)
            except ValueError:
                address = None
            if address is None or name != name_text:
                raise CorruptStore(f"a line is not an address and a name: {line[:80]!r}")
            family = families.get(address.version)
            number = family.number(address) if family is not None else None
            if number is None:
                left_out += 1
                continue
            if name in family.by_name or number in family.by_number:
                raise CorruptStore(f"{name_text} or {address_text} appears twice")
            family.hold(name, number)
        for family in families.values():
            family.never_used = max(family.by_number, default=-1) + 1
            family.freed = sorted(set(range(family.never_used)) - family.by_number.keys(), reverse=True)
        return families, left_out


def encode(snapshot: list) -> bytes:
    """The store's bytes for a ``FakeIps.snapshot()``: a second or so at 65536 names, hence apart from it."""
    lines = [f"{family.address(number)} {name}\n" for family, names in snapshot for name, number in names]
    return STORE_HEADER + zlib.compress("".join(lines).encode("ascii"))


def for_config(config) -> FakeIps | None:
    """The pool a relay.config.Config asks for: None in real mode."""
    if config.dns_mode != "fake-ip":
        return None
    return FakeIps(config.fake_ip_range, excluded_suffixes(config))


def excluded_suffixes(config) -> list[str]:
    """Names answered as in real mode: --fake-ip-exclude, and --bypass-domain (connected directly, so by the real
    address: the relay cannot connect directly to a fake one)."""
    return [*config.fake_ip_exclude, *config.bypass_domain]


def fakeable(name: str) -> str | None:
    """``name`` lower-cased, without its trailing dot, if a proxy could be asked for it; a single label is a LAN name
    (or one a search domain was meant to complete), which the far side cannot reach."""
    hostname = valid_hostname(name)
    return hostname if hostname is not None and "." in hostname else None
