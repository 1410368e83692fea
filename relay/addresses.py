"""Addresses as text: the one place that knows an IPv6 literal takes brackets beside a port."""


def is_ipv6(host: str) -> bool:
    """Whether ``host`` (an address literal, or a name) is an IPv6 address: names have no colon."""
    return ":" in host


def bracketed(host: str) -> str:
    return f"[{host}]" if is_ipv6(host) else host


def format_address(address: tuple) -> str:
    """``host:port`` for a socket address tuple, ``[host]:port`` for IPv6."""
    return f"{bracketed(address[0])}:{address[1]}"
