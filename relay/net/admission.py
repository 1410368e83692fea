"""Admission: whether an accepted connection may be relayed at all, and whether it goes direct.

Plain functions of what they are given (addresses, settings, counts), so
each rule can be tested without sockets, root or namespaces. The one
question that needs the kernel, whether an address is this router's own,
is asked by the caller's ``is_local`` (see LocalAddresses).
"""

import functools
import ipaddress
import resource
import socket
import time

from relay.config import Config
from relay.net.sockets import is_local_address

WILDCARDS = ("0.0.0.0", "::")
# Destinations that are never relayed unless --allow-dest says so: they mean this
# router (or the proxy's machine), not something beyond it.
REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(text)
    for text in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128")
)
# One relayed connection holds two sockets and, while data flows, two pipes.
FDS_PER_CONNECTION = 6
# Listeners, epoll, logs, the metrics server, health checks, ssh: never handed to connections.
# (Pooled pipes come from connections that ended, so they fit in the freed slots' share.)
# A quarter of a small limit is plenty; 256 fds then still relay 32 connections, not 9.
RESERVED_FDS = 200
# One client address may hold this share of the budget by default, but at least PER_SOURCE_FLOOR:
# a host cannot lock the others out, and a busy one (a docker pull, a NATed LAN) is not cut short.
PER_SOURCE_SHARE = 4
PER_SOURCE_FLOOR = 256
LOCAL_ADDRESS_TTL = 10.0  # seconds a "is this one of our addresses" answer is kept
LOCAL_ADDRESSES_KEPT = 1024
HOSTS_FILE = "/etc/hosts"
HOSTS_FILE_MAX_BYTES = 1 << 20  # more than any hosts file; what is past it is not read


def connection_budget(config: Config) -> int:
    """--max-connections, or as many as the fd limit allows (each costs FDS_PER_CONNECTION)."""
    if config.max_connections:
        return config.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, (soft - min(RESERVED_FDS, soft // 4)) // FDS_PER_CONNECTION)


# Per connection, parsing the destination and testing it against REFUSED_NETWORKS were a
# noticeable part of the handler's CPU; most connections go to addresses seen before.
# Bounded: a scan of many addresses only evicts the oldest.
parse_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


@functools.lru_cache(maxsize=4096)
def in_refused_network(host: str) -> bool:
    """Whether ``host`` (an address) is in REFUSED_NETWORKS: it means this machine, not a server."""
    address = parse_address(host)
    return any(address in network for network in REFUSED_NETWORKS)


class LocalAddresses:
    """``is_local(host)``: whether an address is one of this router's, asked of the kernel (a bind)
    at most once per LOCAL_ADDRESS_TTL per address; bounded, so a scan cannot grow it."""

    def __init__(self, probe=is_local_address, clock=time.monotonic):
        self._probe, self._clock = probe, clock
        self._known: dict[str, tuple[bool, float]] = {}

    def __call__(self, host: str) -> bool:
        now = self._clock()
        known = self._known.get(host)
        if known is None or known[1] < now:
            if len(self._known) >= LOCAL_ADDRESSES_KEPT:
                self._known.clear()
            known = self._known[host] = (self._probe(host), now + LOCAL_ADDRESS_TTL)
        return known[0]


def names_of_own_addresses(hosts_text: str, is_own_address) -> set[str]:
    """The names a hosts file gives to addresses ``is_own_address`` says are this machine's."""
    names = set()
    for line in hosts_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        if is_own_address(str(address)):
            names.update(name.lower().removesuffix(".") for name in fields[1:])
    return names


class OwnNames:
    """``own_names(name)``: whether a name means this router, so a proxy on its loopback (ssh -L,
    a local squid) would reach the router itself: its hostname, and whatever the hosts file maps
    to loopback or to one of its addresses. Read at start and on reload."""

    def __init__(self, is_local, hosts_file: str = HOSTS_FILE, hostname=socket.gethostname):
        self._is_local, self._hosts_file, self._hostname = is_local, hosts_file, hostname
        self.names: frozenset[str] = frozenset()
        self.load()

    def load(self) -> None:
        hostname = self._hostname().lower().removesuffix(".")
        names = {hostname, hostname.split(".", 1)[0]} if hostname else set()
        try:
            with open(self._hosts_file, encoding="utf-8", errors="replace") as hosts:
                text = hosts.read(HOSTS_FILE_MAX_BYTES)
        except OSError:
            text = ""
        names |= names_of_own_addresses(text, lambda host: in_refused_network(host) or self._is_local(host))
        self.names = frozenset(names)

    def __call__(self, name: str) -> bool:
        return name in self.names


def loop_reason(peer, dst, *, own_sources, proxy_addresses, listening, is_local) -> str | None:
    """Why this connection must not be relayed, if it is a loop or aimed at the relay itself.

    ``own_sources``: local addresses of our open upstream sockets (a client coming from one is
    our own traffic looped back); ``listening``: the (host, port) of our listeners."""
    if peer in own_sources:
        return "it comes from the relay's own upstream connection (a routing loop: exempt --mark traffic)"
    if dst in proxy_addresses:
        return "its destination is the upstream proxy itself (a routing loop: exempt --mark traffic)"
    for host, port in listening:
        if dst[1] == port and (dst[0] == host or (host in WILDCARDS and is_local(dst[0]))):
            return "its destination is the relay's own listening port"
    return None


def destination_refusal(config: Config, dst, *, refused_endpoints, is_local) -> str | None:
    """Why the destination policy refuses ``dst`` (the router, loopback, link-local, the SSH server)."""
    if config.allow_dest:
        address = parse_address(dst[0])
        if any(address in network for network in config.allow_dest):
            return None
    if dst in refused_endpoints:
        return "it is the SSH server of the tunnel"
    if in_refused_network(dst[0]):
        return "loopback, link-local or unspecified addresses mean this machine, not a server"
    if is_local(dst[0]):
        return "it is one of the router's own addresses"
    return None


def per_source_cap(config: Config, budget: int) -> int:
    """--max-per-source (0: no limit), or by default a quarter of the budget, at least
    PER_SOURCE_FLOOR of it."""
    if config.max_per_source is not None:
        return config.max_per_source
    return max(budget // PER_SOURCE_SHARE, min(PER_SOURCE_FLOOR, budget))


def per_source_refusal(cap: int, source: str, per_source: dict[str, int]) -> str | None:
    """Why another connection from ``source`` is refused (--max-per-source, or its default ``cap``)."""
    if cap and per_source.get(source, 0) >= cap:
        return f"{cap} connections from {source} already (--max-per-source)"
    return None


def bypassed(config: Config, dst, hostname: str | None) -> bool:
    """Whether this destination goes direct (--bypass, --bypass-domain) instead of through a proxy."""
    if config.bypass:
        address = parse_address(dst[0])
        if any(address in network for network in config.bypass):
            return True
    if hostname and config.bypass_domain:
        return any(hostname == suffix or hostname.endswith("." + suffix) for suffix in config.bypass_domain)
    return False
