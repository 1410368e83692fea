"""Addresses as text: the one place that knows an IPv6 literal takes brackets beside a port, and reads an
IPv4-mapped IPv6 address as the IPv4 address it is."""

import ipaddress


def is_ipv6(host: str) -> bool:
    """Whether ``host`` (an address literal, or a name) is an IPv6 address: names have no colon."""
    return ":" in host


def bracketed(host: str) -> str:
    return f"[{host}]" if is_ipv6(host) else host


def format_address(address: tuple) -> str:
    """``host:port`` for a socket address tuple, ``[host]:port`` for IPv6."""
    return f"{bracketed(address[0])}:{address[1]}"


def plain_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address in ``text``; an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as the
    IPv4 address it is. ValueError if ``text`` is no address."""
    parsed = ipaddress.ip_address(text)
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed
