"""Split resolution, sans-IO: which questions the LAN's own resolver answers (--dns-local), not the far side's.

Names under --dns-local-domain or --bypass-domain go local, so LAN names and domestic CDNs keep their local
answers; so do the reverse names of the LAN's own kinds of addresses, which only the LAN can answer and which
would tell the far side what addresses the LAN uses. Everything else goes far.
"""

import functools
import ipaddress
from collections.abc import Iterable

import dns.name

from relay.dns.wire import Key

# Addresses only the LAN knows names for.
LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(text)
    for text in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "100.64.0.0/10",  # RFC 6598: the ISP's side of carrier-grade NAT
        "127.0.0.0/8", "169.254.0.0/16",  # loopback, link-local
        "fc00::/7", "fe80::/10", "::1/128",  # unique local, link-local, loopback
    )
)  # fmt: skip
IN_ADDR_ARPA = dns.name.from_text("in-addr.arpa.")
IP6_ARPA = dns.name.from_text("ip6.arpa.")
HEX_DIGITS = frozenset(b"0123456789abcdef")
REVERSE_ZONES = ("in-addr.arpa.", "ip6.arpa.")  # names ending so may be reverse names: dnspython decides


def goes_local(key: Key, local_suffixes: Iterable[str], bypass_suffixes: Iterable[str]) -> bool:
    """Whether the question ``key`` is for the local resolver: its name is under one of the suffixes, or is the
    reverse name of a LOCAL_NETWORKS address (whatever the type: PTR, or the SOA a tool asks to find the zone)."""
    suffixes = [_suffix_text(suffix) for suffix in (*local_suffixes, *bypass_suffixes)]
    name = key[0].lower()
    # Without escapes, a name's text ends with a suffix's at a dot exactly when it is under it: no dnspython.
    if "\\" not in name and not name.endswith(REVERSE_ZONES) and not any("\\" in suffix for suffix in suffixes):
        return any(suffix == "." or name == suffix or name.endswith("." + suffix) for suffix in suffixes)
    return parsed_goes_local(key, local_suffixes, bypass_suffixes)


def parsed_goes_local(key: Key, local_suffixes: Iterable[str], bypass_suffixes: Iterable[str]) -> bool:
    """goes_local by dnspython's names, for any name."""
    name = dns.name.from_text(key[0])
    for suffix in (*local_suffixes, *bypass_suffixes):
        if name.is_subdomain(_suffix_name(suffix)):
            return True
    network = reverse_network(name)
    return network is not None and any(
        network.version == local.version and network.subnet_of(local) for local in LOCAL_NETWORKS
    )


@functools.lru_cache(maxsize=1024)  # the settings' suffixes, parsed once rather than on every question
def _suffix_name(suffix: str) -> dns.name.Name:
    return dns.name.from_text(suffix)


@functools.lru_cache(maxsize=1024)
def _suffix_text(suffix: str) -> str:
    """A suffix as a key writes its name: lower-cased, escaped, with the trailing dot."""
    return _suffix_name(suffix).to_text().lower()


def reverse_network(name: dns.name.Name) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The addresses a name under in-addr.arpa or ip6.arpa stands for; None for any other name.

    ``1.168.192.in-addr.arpa.`` is 192.168.1.0/24, a whole address's name is that address alone. Labels left
    of the first one that is not an octet (a nibble), or of the last one an address has, do not narrow it:
    such a name still lies in that network's reverse zone, and whoever answers the zone answers it.
    """
    if name.is_subdomain(IN_ADDR_ARPA):
        octets = _leading(reversed(name.relativize(IN_ADDR_ARPA).labels), 4, _is_octet)
        packed = bytes(int(label) for label in octets).ljust(4, b"\0")
        return ipaddress.IPv4Network((packed, 8 * len(octets)))
    if name.is_subdomain(IP6_ARPA):
        nibbles = _leading(reversed(name.relativize(IP6_ARPA).labels), 32, _is_nibble)
        value = int(b"".join(nibbles) or b"0", 16) << 4 * (32 - len(nibbles))
        return ipaddress.IPv6Network((value, 4 * len(nibbles)))
    return None


def _leading(labels: Iterable[bytes], most: int, valid) -> list[bytes]:
    """The first ``most`` labels at most, up to the first that is not ``valid``."""
    taken = []
    for label in labels:
        if len(taken) == most or not valid(label):
            break
        taken.append(label)
    return taken


def _is_octet(label: bytes) -> bool:
    """A decimal 0-255 as in-addr.arpa writes it: no sign, no leading zero."""
    return 0 < len(label) <= 3 and label.isdigit() and (label == b"0" or label[:1] != b"0") and int(label) <= 255


def _is_nibble(label: bytes) -> bool:
    return len(label) == 1 and label.lower()[0] in HEX_DIGITS
