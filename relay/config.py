"""Settings, upstream URLs and their validation.

Everything here is plain data: parsing raises ConfigError with a message fit
for one line on stderr, and no password ever reaches a message or a repr.
"""

import ipaddress
import urllib.parse
from dataclasses import dataclass, field

UPSTREAM_SCHEMES = ("http", "socks5", "socks4", "socks4a")
DEFAULT_PORT = 12345


class ConfigError(Exception):
    """A setting that cannot work; the message is shown to the user as is."""


class Secret:
    """A string that prints as *** everywhere: logs, errors, reprs, metrics."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __eq__(self, other):
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self):
        return hash(self._value)


@dataclass(frozen=True)
class Upstream:
    """Where connections are sent: a proxy (scheme http/socks4/socks4a/socks5) or ``direct``."""

    scheme: str
    host: str = ""
    port: int = 0
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.scheme == "direct":
            return "direct"
        auth = ""
        if self.username is not None:
            auth = urllib.parse.quote(self.username, safe="") + (":***" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Upstream({str(self)!r})"


def redact_url(text: str) -> str:
    """The URL as typed, with any password replaced by ***, for error messages."""
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostpart}"


def parse_upstream(text: str) -> Upstream:
    """Parse ``HOST:PORT`` (an HTTP proxy), ``SCHEME://[user:pass@]HOST:PORT`` or ``direct``."""
    if text == "direct":
        return Upstream("direct")
    shown = redact_url(text)
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid upstream {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        known = ", ".join(f"{s}://" for s in UPSTREAM_SCHEMES)
        raise ConfigError(f"invalid upstream {shown!r}: unknown scheme {scheme!r} (use {known} or direct)")
    if not parts.hostname:
        raise ConfigError(f"invalid upstream {shown!r}: no host")
    if port is None or port == 0:
        raise ConfigError(f"invalid upstream {shown!r}: a port is required (HOST:PORT)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid upstream {shown!r}: only SCHEME://[user:pass@]HOST:PORT is allowed")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = Secret(urllib.parse.unquote(parts.password)) if parts.password is not None else None
    if scheme in ("http", "socks5") and username is not None and password is None:
        raise ConfigError(f"invalid upstream {shown!r}: give the password too (user:password@)")
    if scheme == "http" and username is not None and ":" in username:
        raise ConfigError(f"invalid upstream {shown!r}: an HTTP Basic user name cannot contain ':'")
    if password is not None and scheme in ("socks4", "socks4a"):
        raise ConfigError(f"invalid upstream {shown!r}: SOCKS4 has no passwords (only a user id)")
    return Upstream(scheme, parts.hostname, port, username, password)


def parse_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` where HOST is an IP literal."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: {host!r} is not an IP address") from None
    if ip.version == 6 and not text.startswith("["):
        raise ConfigError(f"invalid {what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"invalid {what} {text!r}: port must be 1-65535")
    return str(ip), int(port_text)


@dataclass
class Config:
    upstream: Upstream
    mode: str = "redirect"  # or "tproxy"
    listen: list[tuple[str, int]] = field(default_factory=list)  # empty: the defaults
    mark: int | None = None
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    pipe_size: int = 0  # 0: the kernel's default
    sniff: bool = True  # ask the proxy for the SNI/Host name instead of the IP
    sniff_timeout: float = 0.3  # how long to wait for the client's first bytes
    http_mode: str = "forward"  # plain HTTP through an HTTP proxy: "forward" (absolute-form) or "connect"
    verbose: int = 0
