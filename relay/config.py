"""Settings, upstream URLs and their validation.

Everything here is plain data: parsing raises ConfigError with a message fit
for one line on stderr, and no password ever reaches a message or a repr.
"""

import copy
import ipaddress
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field, replace

from relay.addresses import bracketed, format_address

UPSTREAM_SCHEMES = ("http", "https", "socks5", "socks4", "socks4a")
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
class TlsOptions:
    """How an https:// upstream's certificate is checked, and ours if it wants one (--upstream-ca, -sni,
    -cert, -key). There is deliberately no way to turn the check off."""

    ca: str | None = None  # CA certificates (PEM); None: the system's
    sni: str | None = None  # the name to ask for and check; None: the proxy's host
    cert: str | None = None  # our certificate chain (PEM), for mutual TLS
    key: str | None = None  # its private key; None: in the cert file


@dataclass(frozen=True)
class Upstream:
    """Where connections are sent: a proxy (scheme http/https/socks4/socks4a/socks5) or ``direct``."""

    scheme: str
    host: str = ""
    port: int = 0
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    early_data: str | None = None  # HTTP only: this upstream's own on|off|auto (the config file's table form)
    udp: bool | None = None  # SOCKS5 only: whether it carries UDP ASSOCIATE (the table form); None: not said
    tls: TlsOptions | None = None  # https:// only (filled in by Config from the --upstream-* TLS settings)

    @property
    def protocol(self) -> str:
        """The proxy protocol spoken: https:// speaks HTTP (CONNECT, absolute form) inside TLS."""
        return "http" if self.scheme == "https" else self.scheme

    @property
    def server_name(self) -> str:
        """https://: the name the proxy's certificate must carry (and SNI asks for)."""
        return (self.tls.sni if self.tls is not None and self.tls.sni else None) or self.host

    def __str__(self) -> str:
        if self.scheme == "direct":
            return "direct"
        auth = ""
        if self.username is not None:
            auth = urllib.parse.quote(self.username, safe="") + (":***" if self.password else "") + "@"
        return f"{self.scheme}://{auth}{format_address((self.host, self.port))}"

    def __repr__(self) -> str:
        return f"Upstream({str(self)!r})"


def redact_url(text: str) -> str:
    """The URL with any password replaced by ***, for metric labels."""
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostpart}"


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
MAX_SOCKS5_CREDENTIAL = 255  # bytes, RFC 1929
MAX_PASSWORD_FILE = 4096  # bytes


EARLY_DATA_CHOICES = ("on", "off", "auto")
UPSTREAM_TABLE_KEYS = ("url", "early-data", "udp")


def parse_upstream_table(table: dict) -> Upstream:
    """An upstream in the config file's table form: ``{ url = "http://...", early-data = "on" }``."""
    unknown = sorted(set(table) - set(UPSTREAM_TABLE_KEYS))
    if unknown:
        raise ConfigError(f"invalid upstream: unknown key {unknown[0]!r} (use {', '.join(UPSTREAM_TABLE_KEYS)})")
    if "url" not in table:
        raise ConfigError("invalid upstream: a table needs its url")
    upstream = parse_upstream(table["url"])
    if "early-data" in table:
        if upstream.protocol != "http":
            raise ConfigError("invalid upstream: early-data is for HTTP proxies (CONNECT) only")
        upstream = replace(upstream, early_data=one_of(*EARLY_DATA_CHOICES)(table["early-data"]))
    if "udp" in table:
        if upstream.scheme != "socks5":
            raise ConfigError("invalid upstream: udp is for SOCKS5 proxies (UDP ASSOCIATE) only")
        upstream = replace(upstream, udp=parse_switch(table["udp"]))
    return upstream


def parse_upstream(text) -> Upstream:
    """Parse ``HOST:PORT`` (an HTTP proxy), ``SCHEME://[user:pass@]HOST:PORT`` or ``direct``.

    The userinfo is everything before the last ``@``, so a password may hold any
    character (``%XX`` in it is decoded). A mistyped URL can put the password
    anywhere, so no message quotes any part of what follows the scheme. A user
    without a password is completed by Config (--upstream-password-file).
    """
    if isinstance(text, dict):
        return parse_upstream_table(text)
    if not isinstance(text, str):
        raise ConfigError("invalid upstream: write it as a string (a URL or 'direct')")
    if text == "direct":
        return Upstream("direct")
    scheme_match = _SCHEME.match(text)
    if scheme_match is None:
        if "@" in text:
            raise ConfigError("invalid upstream: user:password@ needs a scheme (http://, https:// or socks5://)")
        scheme, authority = "http", text
    else:
        scheme, authority = scheme_match[1].lower(), text[scheme_match.end() :]
        if scheme not in UPSTREAM_SCHEMES:
            known = ", ".join(f"{s}://" for s in UPSTREAM_SCHEMES)
            raise ConfigError(f"invalid upstream: unknown scheme {scheme!r} (use {known} or direct)")
    userinfo, at, host_part = authority.rpartition("@")
    host, port = _proxy_address(host_part)
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = urllib.parse.unquote(user_text)
        password = Secret(urllib.parse.unquote(password_text)) if colon else None
    try:  # a byte that is not UTF-8 on the command line arrives as a lone surrogate
        f"{username or ''}{password.reveal() if password else ''}".encode()
    except UnicodeEncodeError:
        raise ConfigError("invalid upstream: the user name and password must be UTF-8 text") from None
    if scheme in ("http", "https") and username is not None and ":" in username:
        raise ConfigError("invalid upstream: an HTTP Basic user name cannot contain ':'")
    if password is not None and scheme in ("socks4", "socks4a"):
        raise ConfigError("invalid upstream: SOCKS4 has no passwords (only a user id)")
    return Upstream(scheme, host, port, username, password)


def _proxy_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``, with an optional trailing ``/``, of an upstream URL."""
    text = text.removesuffix("/")
    if any(c in text for c in "/?#"):
        raise ConfigError("invalid upstream: only SCHEME://[user:pass@]HOST:PORT is allowed (no path or query)")
    if text.startswith("["):
        host, bracket, port_part = text[1:].partition("]")
        if not bracket:
            raise ConfigError("invalid upstream: an IPv6 address needs its closing ']'")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ConfigError("invalid upstream: what is in [] is not an IPv6 address") from None
        if port_part and not port_part.startswith(":"):
            raise ConfigError("invalid upstream: expected :PORT after ']'")
        port_text = port_part[1:]
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
        if ":" in host:
            raise ConfigError("invalid upstream: write an IPv6 address as [ADDR]:PORT")
        if not host.isprintable() or any(c.isspace() or c in "[]" for c in host):
            raise ConfigError("invalid upstream: the host is not a name or an address")
        host = host.lower()
    if not host:
        raise ConfigError("invalid upstream: no host")
    if not port_text:
        raise ConfigError("invalid upstream: a port is required (HOST:PORT)")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError("invalid upstream: the port is not a number")
    if not 0 < int(port_text) < 65536:
        raise ConfigError("invalid upstream: the port is out of range (1-65535)")
    return host, int(port_text)


def read_password_file(path) -> Secret:
    """The one line of a password file, without its line ending; no message shows what it holds."""
    path = _text(path)
    try:
        with open(path, "rb") as file:
            content = file.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(content) > MAX_PASSWORD_FILE:
        raise ConfigError(f"{path} is longer than {MAX_PASSWORD_FILE} bytes")
    try:
        password = content.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    if not password:
        raise ConfigError(f"{path} is empty")
    if "\n" in password or "\r" in password:
        raise ConfigError(f"{path} holds more than one line (only the password belongs there)")
    return Secret(password)


def _complete_passwords(upstreams: list[Upstream], password: Secret | None, key_prefix: str) -> list[Upstream]:
    """Give ``password`` (from the password file) to each upstream that names a user but no password."""
    waiting = [u.protocol in ("http", "socks5") and u.username is not None and u.password is None for u in upstreams]
    if password is not None and not any(waiting):
        raise ConfigError(
            f"{key_prefix}upstream-password-file: no upstream names a user without a password "
            "(write socks5://USER@HOST:PORT or http://USER@HOST:PORT)"
        )
    completed = []
    for number, (upstream, needs_password) in enumerate(zip(upstreams, waiting), 1):
        which = _which(f"{key_prefix}upstream", number, len(upstreams))
        if needs_password:
            if password is None:
                raise ConfigError(
                    f"{which}: a user but no password: give the password too (user:password@), "
                    f"or {key_prefix}upstream-password-file"
                )
            upstream = replace(upstream, password=password)
        if upstream.scheme == "socks5" and upstream.password is not None:
            for name, value in (("user name", upstream.username), ("password", upstream.password.reveal())):
                if len(value.encode()) > MAX_SOCKS5_CREDENTIAL:
                    raise ConfigError(f"{which}: the SOCKS5 {name} is longer than {MAX_SOCKS5_CREDENTIAL} bytes")
        completed.append(upstream)
    return completed


TLS_SETTINGS = ("upstream_ca", "upstream_sni", "upstream_cert", "upstream_key")


def _with_tls_options(fields: dict, key_prefix: str) -> list[Upstream]:
    """Give the --upstream-ca/-sni/-cert/-key settings to each https:// upstream; an error if they are
    given with none, or a key without its certificate."""
    upstreams = fields["upstreams"]
    given = [name for name in TLS_SETTINGS if fields.get(name) is not None]
    option = {name: key_prefix + name.replace("_", "-") for name in TLS_SETTINGS}
    if given and not any(upstream.scheme == "https" for upstream in upstreams):
        raise ConfigError(f"{option[given[0]]}: no upstream is https://")
    if fields.get("upstream_key") is not None and fields.get("upstream_cert") is None:
        raise ConfigError(f"{option['upstream_key']} needs {option['upstream_cert']} (the certificate it goes with)")
    tls = TlsOptions(*(fields.get(name) for name in TLS_SETTINGS))
    return [replace(upstream, tls=tls) if upstream.scheme == "https" else upstream for upstream in upstreams]


def _readable_file(value) -> str:
    """A path to a file this process can read now (a missing certificate is found at start, not per connection)."""
    path = _text(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"{path}: no such readable file")
    return path


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_SERVER_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\.?")


def parse_server_name(value) -> str:
    """A DNS name or an IP address, as a certificate names its holder."""
    text = _text(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _SERVER_NAME.fullmatch(text):
        raise ConfigError(f"{text!r} is not a host name or an IP address")
    return text.lower().rstrip(".")


def _which(option: str, number: int, count: int) -> str:
    """The option, and which of its values when it has several."""
    return f"{option} #{number}" if count > 1 else option


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


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str):  # ipaddress would take a TOML number as an address
        raise ConfigError(f"{text!r} is not a network in CIDR form; write it as a string, in quotes")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"invalid CIDR {text!r}") from None


MIN_FAKE_IP_ADDRESSES = 256  # fewer, and names would take each other's addresses within minutes


def parse_fake_ip_range(text) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not a network in CIDR form; write it as a string, in quotes")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        hint = " (host bits set? write the network's own address)" if "host bits" in str(exc) else ""
        raise ConfigError(f"{text!r} is not a network in CIDR form{hint}") from None
    if network.num_addresses < MIN_FAKE_IP_ADDRESSES:
        raise ConfigError(
            f"{text} is too small for fake addresses: at least /{network.max_prefixlen - 8} (256 addresses)"
        )
    return network


def parse_domain_suffix(text: str) -> str:
    suffix = text.lower().strip(".")
    if not suffix or any(
        not label or not label.replace("-", "").replace("_", "").isalnum() for label in suffix.split(".")
    ):
        raise ConfigError(f"invalid domain suffix {text!r}")
    return suffix


@dataclass(frozen=True)
class DnsUpstream:
    """Where the DNS service resolves: ``udp`` (directly), ``tcp`` or ``https`` (DoH, RFC 8484),
    both through the relay's own upstream proxy."""

    scheme: str
    host: str
    port: int
    path: str = ""  # https only

    def __str__(self) -> str:
        return f"{self.scheme}://{bracketed(self.host)}:{self.port}{self.path}"


DNS_PORTS = {"udp": 53, "tcp": 53, "https": 443}
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def parse_dns_upstream(text: str) -> DnsUpstream:
    usage = "a DNS upstream is udp://IP[:PORT], tcp://IP[:PORT] or https://HOST[:PORT]/PATH"
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in DNS_PORTS:
        raise ConfigError(f"{text!r}: {usage}")
    authority, slash, path = rest.partition("/")
    if "@" in authority:  # not quoted: it would show a password
        raise ConfigError("a DNS upstream URL takes no user or password")
    if slash and scheme != "https":
        raise ConfigError(f"{text!r}: {usage}")
    if authority.startswith("["):
        host, closed, after = authority[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else None if after or not closed else ""
    else:
        host, _, port_text = authority.partition(":")
    if port_text is None or (port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536)):
        raise ConfigError(f"{text!r}: the port must be 1-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if scheme != "https" or not _DNS_NAME.fullmatch(host):
            raise ConfigError(f"{text!r}: {usage}") from None
    path = "/" + (path or "dns-query") if scheme == "https" else ""  # RFC 8484's usual path when none is given
    return DnsUpstream(scheme, host.lower(), int(port_text or DNS_PORTS[scheme]), path)


def parse_seconds(value, allow_zero: bool = False) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or not (seconds > 0 or (allow_zero and seconds == 0)):
        raise ConfigError(f"{value!r} is not a number of seconds {'of at least' if allow_zero else 'above'} 0")
    return seconds


def parse_count(value, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        count = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        count = None
    if count is None or count < minimum:
        raise ConfigError(f"{value!r} is not a whole number of at least {minimum}")
    if maximum is not None and count > maximum:
        raise ConfigError(f"{value!r} is more than {maximum}")
    return count


PRECONNECT_MAX = 64
UDP_MAX_SESSIONS = 1 << 20  # each holds a TCP control connection and a UDP socket: fds run out first
SSH_CONNECTIONS_AUTO_MAX = 4  # ssh encrypts on one core per process; beyond the cores more only share them
SSH_CONNECTIONS_MAX = 16
SSH_CONNECTIONS_DEFAULT = max(1, min(os.cpu_count() or 1, SSH_CONNECTIONS_AUTO_MAX))


def parse_ssh_connections(value) -> int:
    return parse_count(value, 1, SSH_CONNECTIONS_MAX)


def parse_preconnect(value) -> int | None:
    """``auto`` (None: sized from the arrival rate), ``off`` (0) or a fixed number per upstream address."""
    if value in ("auto", "off"):
        return None if value == "auto" else 0
    try:
        return parse_count(value, 1, PRECONNECT_MAX)
    except ConfigError:
        raise ConfigError(f"{value!r} is not 'auto', 'off' or a number from 1 to {PRECONNECT_MAX}") from None


def parse_mark(value) -> int:
    try:
        mark = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 0)
    except ValueError:
        mark = None
    if mark is None or not 0 < mark <= 0xFFFFFFFF:
        raise ConfigError(f"{value!r} is not a mark between 1 and 0xffffffff")
    return mark


def parse_switch(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("on", "true", "yes", "1"):
        return True
    if str(value).lower() in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{value!r} is not on or off")


def parse_ports(value) -> frozenset[int]:
    """``22,25,587`` (or a TOML number or list of numbers), or ``none``."""
    if isinstance(value, str):
        items = [] if value.strip().lower() == "none" else value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    ports = set()
    for item in items:
        text = str(item).strip() if not isinstance(item, bool) else ""
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"{value!r} is not a list of ports (1-65535, e.g. 22,25) or 'none'")
        ports.add(int(text))
    return frozenset(ports)


def one_of(*choices):
    def parse(value):
        if value not in choices:
            raise ConfigError(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return parse


def parse_option_pair(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key.isalnum():
        raise ConfigError(f"{text!r} is not KEY=VALUE")
    return key, value


def _text(value) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{value!r} is not a non-empty string")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting, the same in the config file (``key = value``) and on the command line (``--key``)."""

    key: str
    parse: object  # str or TOML value -> the value Config holds
    default: object = None
    repeatable: bool = False
    metavar: str | None = None
    help: str = ""
    attribute: str | None = None  # the Config field, when not the key with underscores

    @property
    def field(self) -> str:
        return self.attribute or self.key.replace("-", "_")


DNS_ALLOW_DEFAULT = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "fc00::/7", "fe80::/10", "::1/128",
)  # fmt: skip
DNS_UPSTREAM_DEFAULT = ("https://1.1.1.1/dns-query", "https://8.8.8.8/dns-query")
# Suffixes no public resolver answers: RFC 8375's, ICANN's private-use TLD, and OpenWrt's default LAN domain.
DNS_LOCAL_DOMAIN_DEFAULT = ("home.arpa", "internal", "lan")
# Protocols whose server speaks first, so the client's first bytes never come before the tunnel opens: FTP control,
# SSH, SMTP, POP3, IMAP, submission, MySQL.
SERVER_FIRST_PORTS_DEFAULT = "21,22,25,110,143,587,3306"
FAKE_IP_RANGE_DEFAULT = ("198.18.0.0/15", "fc00::/18")  # RFC 2544 benchmarking; the start of the ULA range
# Names that must get their real addresses in fake-ip mode: local names, names used over UDP (which fake addresses
# do not carry: NTP, STUN), and connectivity checks that compare the answer with a known address (Windows NCSI) or
# must work while the relay restarts (Android, Apple, Windows, Firefox, Ubuntu, GNOME).
FAKE_IP_EXCLUDE_DEFAULT = (
    "local", "lan", "home.arpa", "localdomain", "internal",
    "pool.ntp.org", "time.windows.com", "time.apple.com", "time.google.com", "time.android.com",
    "time.cloudflare.com", "ntp.ubuntu.com", "stun.l.google.com",
    "connectivitycheck.gstatic.com", "connectivitycheck.android.com", "clients3.google.com",
    "captive.apple.com", "msftconnecttest.com", "msftncsi.com", "detectportal.firefox.com",
    "connectivity-check.ubuntu.com", "nmcheck.gnome.org",
)  # fmt: skip

SETTINGS = [
    Setting(
        "upstream",
        parse_upstream,
        [],
        True,
        "URL",
        "HOST:PORT or http://[user:pass@]HOST:PORT (HTTP CONNECT), https://[user:pass@]HOST:PORT (HTTP CONNECT "
        "over TLS, the certificate checked), socks5://[user:pass@]HOST:PORT, "
        "socks4://HOST:PORT, socks4a://HOST:PORT, or 'direct'; repeatable (failover in order). "
        "Every local user can read a password given here in /proc/PID/cmdline: use "
        "--upstream-password-file or --config instead",
        "upstreams",
    ),
    Setting(
        "upstream-password-file",
        read_password_file,
        None,
        False,
        "FILE",
        "the password of each upstream that names a user and no password (socks5://USER@HOST:PORT); "
        "one line, read again on SIGHUP",
        "upstream_password",
    ),
    Setting(
        "upstream-ca",
        _readable_file,
        None,
        False,
        "FILE",
        "https:// upstreams: check the proxy's certificate against these CA certificates (PEM) instead of the "
        "system's; there is no option to skip the check",
    ),
    Setting(
        "upstream-sni",
        parse_server_name,
        None,
        False,
        "NAME",
        "https:// upstreams: the name sent as SNI and required in the proxy's certificate (default: the host of "
        "the URL; an address is checked against the certificate's IP addresses)",
    ),
    Setting(
        "upstream-cert",
        _readable_file,
        None,
        False,
        "FILE",
        "https:// upstreams: our certificate (PEM, chain), for a proxy that requires one (mutual TLS)",
    ),
    Setting(
        "upstream-key",
        _readable_file,
        None,
        False,
        "FILE",
        "the private key (PEM) of --upstream-cert (default: in the --upstream-cert file)",
    ),
    Setting(
        "upstream-strategy",
        one_of("failover", "round-robin"),
        "failover",
        False,
        "failover|round-robin",
        "how new connections pick among healthy upstreams (default: failover)",
    ),
    Setting(
        "mode",
        one_of("redirect", "tproxy"),
        "redirect",
        False,
        "redirect|tproxy",
        "how connections are intercepted (default: redirect)",
    ),
    Setting(
        "listen",
        lambda v: parse_host_port(v, "listen address"),
        [],
        True,
        "HOST:PORT",
        "address to listen on, repeatable (default: 0.0.0.0:12345 and [::]:12345)",
    ),
    Setting("mark", parse_mark, None, False, "N", "SO_MARK for upstream sockets, so firewall rules can exempt them"),
    Setting("connect-timeout", parse_seconds, 5.0, False, "S", "upstream TCP connect (default: 5)"),
    Setting("handshake-timeout", parse_seconds, 10.0, False, "S", "proxy handshake (default: 10)"),
    Setting(
        "name-wait",
        parse_seconds,
        2.0,
        False,
        "S",
        "when the proxy has not answered for a sniffed name this long, ask it for the address too, and keep "
        "whichever opens first (default: 2; at or above --handshake-timeout: never)",
    ),
    Setting(
        "early-data",
        one_of(*EARLY_DATA_CHOICES),
        "auto",
        False,
        "on|off|auto",
        "send a TLS client's ClientHello to an HTTP proxy right after CONNECT, a round trip sooner, for proxies "
        "that keep it for the tunnel; auto: only those the relay found to keep it (a probe to --health-target, "
        "a TLS server); per upstream in the config file (default: auto)",
    ),
    Setting("idle-timeout", parse_seconds, 600.0, False, "S", "reset connections idle this long (default: 600)"),
    Setting(
        "half-closed-timeout",
        parse_seconds,
        60.0,
        False,
        "S",
        "once one direction has ended, reset if the other is silent this long (default: 60)",
    ),
    Setting(
        "confirm-eof",
        parse_switch,
        False,
        False,
        "on|off",
        "hold each FIN from a proxy until a new connection to it shows it still answers; "
        "if not, reset the client instead of ending a truncated transfer cleanly (default: off)",
    ),
    Setting(
        "max-connections",
        parse_count,
        0,
        False,
        "N",
        "relayed connections at once; past it, new ones wait in the backlog (default: from the fd limit)",
    ),
    Setting(
        "max-per-source",
        parse_count,
        None,
        False,
        "N",
        "relayed connections at once from one client address; 0: no limit "
        "(default: a quarter of --max-connections, at least 256 of it)",
    ),
    Setting(
        "allow-dest",
        parse_cidr,
        [],
        True,
        "CIDR",
        "relay these destinations even if they are the router, loopback or link-local (normally refused); repeatable",
    ),
    Setting(
        "sniff",
        parse_switch,
        True,
        False,
        "on|off",
        "ask the proxy for the hostname from TLS SNI or the HTTP Host header, so the far side resolves it "
        "(default: on)",
    ),
    Setting(
        "sniff-timeout",
        parse_seconds,
        0.3,
        False,
        "S",
        "wait this long for the client's first bytes before connecting by address (default: 0.3)",
    ),
    Setting(
        "server-first-ports",
        parse_ports,
        parse_ports(SERVER_FIRST_PORTS_DEFAULT),
        False,
        "PORTS|none",
        "destination ports of protocols where the server speaks first: connected at once, without waiting "
        f"--sniff-timeout for the client's bytes (default: {SERVER_FIRST_PORTS_DEFAULT})",
    ),
    Setting(
        "preconnect",
        parse_preconnect,
        None,
        False,
        "N|auto|off",
        "keep this many connections to each proxy opened ahead of clients, so a new one skips the connect's "
        "round trip (through ssh -L: ssh's channel opening); 'auto' sizes it from the recent arrival rate "
        "(default: auto)",
    ),
    Setting(
        "http-mode",
        one_of("forward", "connect"),
        "forward",
        False,
        "forward|connect",
        "plain HTTP through an HTTP proxy: 'forward' sends requests in absolute form, 'connect' tunnels them "
        "(default: forward)",
    ),
    Setting(
        "http-upgrade",
        one_of("forward", "tunnel"),
        "tunnel",
        False,
        "forward|tunnel",
        "with --http-mode forward, an Upgrade request (WebSocket over ws://): 'forward' sends it in absolute "
        "form and the connection becomes a tunnel after the proxy's 101 (squid 5 needs "
        "http_upgrade_request_protocols), 'tunnel' opens a CONNECT tunnel for it (default: tunnel)",
    ),
    Setting(
        "bypass",
        parse_cidr,
        [],
        True,
        "CIDR",
        "connect to these destinations directly, not through the upstream; repeatable",
    ),
    Setting(
        "bypass-domain",
        parse_domain_suffix,
        [],
        True,
        "SUFFIX",
        "connect directly when the hostname (sniffed, or from the DNS service) ends with SUFFIX; repeatable",
    ),
    Setting(
        "health-interval",
        parse_seconds,
        10.0,
        False,
        "S",
        "active upstream health checks this often; a lone upstream only while it is marked down (default: 10)",
    ),
    Setting(
        "health-target",
        lambda v: parse_host_port(v, "health target"),
        None,
        False,
        "HOST:PORT",
        "active checks do a full proxy handshake to this destination (default: ask the proxy a question it answers "
        "itself)",
    ),
    Setting(
        "health-failures",
        lambda v: parse_count(v, 1),
        3,
        False,
        "N",
        "an upstream is unhealthy after N failures in a row (default: 3)",
    ),
    Setting(
        "drain-time",
        lambda v: parse_seconds(v, allow_zero=True),
        30.0,
        False,
        "S",
        "on SIGTERM, let open connections finish for this long (default: 30)",
    ),
    Setting(
        "metrics",
        lambda v: parse_host_port(v, "metrics address"),
        None,
        False,
        "HOST:PORT",
        "serve Prometheus metrics on http://HOST:PORT/metrics and the live status page on http://HOST:PORT/",
    ),
    Setting("log-format", one_of("text", "json"), "text", False, "text|json", "log line format (default: text)"),
    Setting(
        "ssh",
        _text,
        None,
        False,
        "[USER@]HOST[:PORT]",
        "start and supervise ssh to this host: -L to each HTTP/SOCKS4 upstream, -D for SOCKS5; "
        "upstream addresses are as seen from there",
    ),
    Setting("ssh-identity", _text, None, False, "FILE", "ssh identity file"),
    Setting("ssh-option", parse_option_pair, [], True, "KEY=VALUE", "extra ssh -o option; repeatable"),
    Setting(
        "ssh-connections",
        parse_ssh_connections,
        SSH_CONNECTIONS_DEFAULT,
        False,
        "N",
        "with --ssh, this many ssh processes (each its own TCP connection) per upstream; a new connection goes to "
        f"the working one with the fewest (default: the number of cores, at most {SSH_CONNECTIONS_AUTO_MAX})",
    ),
    Setting(
        "ssh-session",
        one_of("auto", "on", "off"),
        "off",
        False,
        "off|auto|on",
        "with --ssh, hold a session running sleep instead of none (-N): OpenSSH's sshd sets TCP_NODELAY only once "
        "a session opens, so without one the far side's small writes in a row wait a round trip for an ACK "
        "(Nagle's algorithm). It needs an account with a shell that allows sessions; auto: when the session's "
        "command ends (no shell, a forced command), or ssh with a session ends at once and without one does not "
        "(MaxSessions 0), ssh runs without one from then on (default: off)",
    ),
    Setting("user", _text, None, False, "NAME", "after binding, run as this user, keeping only CAP_NET_ADMIN"),
    Setting(
        "workers", lambda v: parse_count(v, 1), 1, False, "N", "worker processes sharing the listeners (SO_REUSEPORT)"
    ),
    Setting(
        "engine",
        one_of("splice", "sockmap"),
        "splice",
        False,
        "ENGINE",
        "what carries established connections: splice (default), or sockmap (experimental: the kernel redirects "
        "segments by BPF; needs CAP_BPF and CAP_NET_ADMIN; falls back to splice; see README)",
    ),
    Setting(
        "sockmap-backlog",
        lambda v: parse_count(v, 1 << 16),
        32 << 20,
        False,
        "BYTES",
        "with --engine sockmap, reset a connection when one direction holds this much in the kernel (default 32 MiB)",
    ),
    Setting(
        "pipe-size",
        parse_count,
        1 << 20,
        False,
        "BYTES",
        "splice pipe size per direction, allocated as data flows (default: 1 MiB; 0: the kernel's 64 KiB)",
    ),
    Setting(
        "lan-iface", _text, [], True, "IFACE", "for 'relay rules': LAN interface whose TCP is intercepted; repeatable"
    ),
    Setting(
        "udp-reject",
        one_of("quic", "all", "off"),
        "quic",
        False,
        "quic|all|off",
        "for 'relay rules': the relay carries TCP only, so reject with ICMP the LAN's UDP to port 443 (QUIC: "
        "clients fall back to TCP at once), or all its UDP, where its TCP is intercepted; off: leave UDP to the "
        "router's own policy (default: quic)",
    ),
    Setting(
        "udp",
        parse_switch,
        None,
        False,
        "on|off",
        "relay the LAN's UDP (TPROXY) through SOCKS5 UDP ASSOCIATE; needs --mode tproxy and a SOCKS5 upstream "
        "that carries UDP (dante: yes; ssh -D: no); on: every SOCKS5 upstream does (default: on when an "
        'upstream is marked udp = "on" in the config file\'s table form, else off)',
    ),
    Setting(
        "udp-idle-timeout",
        parse_seconds,
        60.0,
        False,
        "S",
        "end a UDP session (and its association) after this long without a datagram either way (default: 60)",
    ),
    Setting(
        "udp-max-sessions",
        lambda v: parse_count(v, 1, UDP_MAX_SESSIONS),
        1024,
        False,
        "N",
        "UDP sessions (client address and port, each its own association) at once; past it new clients' "
        "datagrams are dropped (default: 1024)",
    ),
    Setting(
        "udp-max-per-source",
        parse_count,
        256,
        False,
        "N",
        "UDP sessions at once from one client address; 0: no limit but --udp-max-sessions (default: 256)",
    ),
    Setting(
        "dns",
        lambda v: parse_host_port(v, "DNS service address"),
        [],
        True,
        "HOST:PORT",
        "serve DNS (UDP and TCP) here, resolved through the tunnel; repeatable (default: no DNS service)",
    ),
    Setting(
        "dns-allow",
        parse_cidr,
        [],
        True,
        "CIDR",
        "clients the DNS service answers; others get REFUSED; repeatable (default: the networks of --lan-iface, "
        "without it the private, loopback and link-local ranges)",
    ),
    Setting(
        "dns-upstream",
        parse_dns_upstream,
        [parse_dns_upstream(text) for text in DNS_UPSTREAM_DEFAULT],
        True,
        "URL",
        "https://HOST[:PORT]/PATH (DoH) or tcp://IP[:PORT], through the upstream proxy, or udp://IP[:PORT] "
        f"directly; repeatable, tried in order (default: {' then '.join(DNS_UPSTREAM_DEFAULT)})",
    ),
    Setting(
        "dns-local",
        parse_dns_upstream,
        [],
        True,
        "URL",
        "the LAN's own resolver, asked for names under --dns-local-domain or --bypass-domain and for the reverse "
        "(PTR) names of private addresses; the same forms as --dns-upstream; repeatable, tried in order "
        "(default: the nameservers in /etc/resolv.conf, read at start)",
    ),
    Setting(
        "dns-local-domain",
        parse_domain_suffix,
        list(DNS_LOCAL_DOMAIN_DEFAULT),
        True,
        "SUFFIX",
        "names ending with SUFFIX are resolved by --dns-local; repeatable "
        f"(default: {', '.join(DNS_LOCAL_DOMAIN_DEFAULT)})",
    ),
    Setting("dns-ca", _text, None, False, "FILE", "CA certificates for DoH upstreams (default: the system's)"),
    Setting(
        "dns-timeout",
        parse_seconds,
        5.0,
        False,
        "S",
        "give up on a query (SERVFAIL) after this long, all DNS upstreams tried (default: 5)",
    ),
    Setting(
        "dns-min-ttl",
        lambda v: parse_seconds(v, True),
        0.0,
        False,
        "S",
        "cache answers at least this long (default: 0)",
    ),
    Setting("dns-max-ttl", parse_seconds, 86400.0, False, "S", "cache answers at most this long (default: 86400)"),
    Setting(
        "dns-cache-size",
        parse_count,
        10000,
        False,
        "N",
        "answers kept in the DNS cache, least recently used dropped first; 0: no cache (default: 10000)",
    ),
    Setting(
        "dns-aaaa",
        parse_switch,
        True,
        False,
        "on|off",
        "answer AAAA queries; off: no IPv6 address for any name, for routers without an IPv6 path (default: on)",
    ),
    Setting(
        "dns-mode",
        one_of("real", "fake-ip"),
        "real",
        False,
        "real|fake-ip",
        "real: answer A/AAAA with the far side's addresses; fake-ip: with addresses from --fake-ip-range that "
        "the relay maps back to the name (default: real)",
    ),
    Setting(
        "fake-ip-range",
        parse_fake_ip_range,
        [parse_fake_ip_range(text) for text in FAKE_IP_RANGE_DEFAULT],
        True,
        "CIDR",
        "where fake addresses come from, at least 256 addresses each; repeatable "
        f"(default: {' and '.join(FAKE_IP_RANGE_DEFAULT)})",
    ),
    Setting(
        "fake-ip-exclude",
        parse_domain_suffix,
        list(FAKE_IP_EXCLUDE_DEFAULT),
        True,
        "SUFFIX",
        "names ending with SUFFIX get real answers in fake-ip mode; repeatable, replaces the defaults "
        "(default: local names, NTP and STUN servers, connectivity checks; see README)",
    ),
    Setting(
        "state-dir",
        _text,
        "/var/lib/relay",
        False,
        "DIR",
        "where the fake-ip mapping is kept across restarts (default: /var/lib/relay)",
    ),
    Setting("verbose", parse_count, 0, False, None, "1: one line per connection; 2: debug"),
]
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass
class Config:
    """Every setting's value; its default is the Setting's (see from_values)."""

    upstreams: list[Upstream]
    upstream_password: Secret | None  # from the password file; already given to the upstreams that needed it
    upstream_ca: str | None  # https:// upstreams: see TlsOptions
    upstream_sni: str | None
    upstream_cert: str | None
    upstream_key: str | None
    upstream_strategy: str
    mode: str
    listen: list[tuple[str, int]]  # empty: the defaults
    mark: int | None
    connect_timeout: float
    handshake_timeout: float
    name_wait: float  # a by-name attempt unanswered this long races one by address
    early_data: str  # "on", "off" or "auto": a ClientHello after CONNECT (relay.proto.early_data)
    idle_timeout: float
    half_closed_timeout: float
    confirm_eof: bool  # hold upstream FINs until the proxy is seen alive (see relay.net.pump)
    max_connections: int  # 0: derived from RLIMIT_NOFILE
    max_per_source: int | None  # None: a share of the budget (relay.net.admission); 0: no limit
    allow_dest: list
    sniff: bool  # ask the proxy for the SNI/Host name instead of the IP
    sniff_timeout: float  # how long to wait for the client's first bytes
    server_first_ports: frozenset[int]  # destination ports never waited for
    preconnect: int | None  # connections per proxy address opened ahead: None auto, 0 off
    http_mode: str  # plain HTTP through an HTTP proxy: "forward" (absolute form) or "connect"
    http_upgrade: str  # an Upgrade request in forward mode: "forward" (absolute form, then a tunnel) or "tunnel"
    bypass: list
    bypass_domain: list[str]
    health_interval: float
    health_target: tuple[str, int] | None
    health_failures: int
    drain_time: float
    metrics: tuple[str, int] | None
    log_format: str
    ssh: str | None
    ssh_identity: str | None
    ssh_option: list[tuple[str, str]]
    ssh_connections: int  # ssh processes per upstream
    ssh_session: str  # auto, on or off
    user: str | None
    workers: int
    engine: str  # "splice", or "sockmap" (relay.net.sockmap); not changed by a reload
    sockmap_backlog: int  # bytes one direction may queue in the kernel before its connection is reset
    pipe_size: int  # fewer, larger splices per wakeup; 0: the kernel's default
    lan_iface: list[str]
    udp_reject: str  # "quic", "all" or "off": for relay rules
    udp: bool | None  # None: on when an upstream is marked udp = "on" (see udp_upstreams)
    udp_idle_timeout: float
    udp_max_sessions: int
    udp_max_per_source: int  # 0: no cap but udp_max_sessions
    dns: list[tuple[str, int]]  # empty: no DNS service
    dns_allow: list
    dns_upstream: list[DnsUpstream]
    dns_local: list[DnsUpstream]  # empty: the nameservers in /etc/resolv.conf (see local_dns_upstreams)
    dns_local_domain: list[str]
    dns_ca: str | None
    dns_timeout: float
    dns_min_ttl: float
    dns_max_ttl: float
    dns_cache_size: int
    dns_aaaa: bool
    dns_mode: str  # "real" or "fake-ip"
    fake_ip_range: list  # IPv4 and IPv6 networks, none overlapping another
    fake_ip_exclude: list[str]  # suffixes answered as in real mode
    state_dir: str
    verbose: int

    def early_data_for(self, upstream: Upstream) -> str:
        """on, off or auto for ``upstream``: its own setting, else --early-data; off for all but HTTP."""
        if upstream.protocol != "http":
            return "off"
        return upstream.early_data or self.early_data

    @property
    def udp_upstreams(self) -> list[Upstream]:
        """The upstreams UDP is relayed through, in order; empty when UDP is not relayed.

        Whether a SOCKS5 proxy carries UDP ASSOCIATE cannot be told from its URL (ssh -D refuses it, dante
        takes it), and ``relay rules`` must know without asking the proxy, so it is said: per upstream
        (``udp = "on"`` in the table form) or for every SOCKS5 upstream (``--udp on``).
        """
        if self.udp is False or self.mode != "tproxy":
            return []
        marked = [u for u in self.upstreams if u.scheme == "socks5" and u.udp]
        if self.udp is None:
            return marked
        return marked or [u for u in self.upstreams if u.scheme == "socks5" and u.udp is not False]

    @property
    def upstream(self) -> Upstream:
        """The first (preferred) upstream."""
        return self.upstreams[0]

    @classmethod
    def from_values(
        cls, values: dict, source: str = "", complete: bool = True, key_prefix: str = ""
    ) -> "Config | None":
        """Validate raw values (strings from the command line, TOML values from a file) keyed by setting.

        With ``complete=False`` only the values given are checked (a file that
        command-line options will complete), and nothing is returned.
        """
        fields = {setting.field: copy.deepcopy(setting.default) for setting in SETTINGS} if complete else {}
        for key, raw in values.items():
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None:
                raise ConfigError(f"{source}unknown setting {key_prefix}{key!r}")
            items = (raw if isinstance(raw, list) else [raw]) if setting.repeatable else [raw]
            parsed = []
            for number, item in enumerate(items, 1):
                try:
                    parsed.append(setting.parse(item))
                except ConfigError as exc:
                    raise ConfigError(f"{source}{_which(key_prefix + key, number, len(items))}: {exc}") from None
                except (AttributeError, TypeError):
                    if isinstance(item, str):
                        raise
                    # A TOML number or boolean where text belongs: the parsers read strings.
                    raise ConfigError(
                        f"{source}{_which(key_prefix + key, number, len(items))}: {item!r} is not valid here; "
                        "write it as a string, in quotes"
                    ) from None
            fields[setting.field] = parsed if setting.repeatable else parsed[0]
        if not complete:
            return None
        if not fields.get("upstreams"):
            raise ConfigError("an upstream is required (for example: --upstream 127.0.0.1:3128)")
        fields["upstreams"] = _complete_passwords(fields["upstreams"], fields["upstream_password"], key_prefix)
        fields["upstreams"] = _with_tls_options(fields, key_prefix)
        if fields["dns"] and fields["workers"] > 1:
            # The names a DNS answer taught one process would be unknown to the worker that gets the connection.
            raise ConfigError("--dns needs --workers 1")
        if fields["dns_mode"] == "fake-ip" and not fields["dns"]:
            raise ConfigError(
                f"{key_prefix}dns-mode fake-ip needs {key_prefix}dns: the fake addresses come from its answers"
            )
        _check_fake_ip_ranges(fields["fake_ip_range"], key_prefix)
        config = cls(**fields)
        if config.udp or config.udp_upstreams:
            _check_udp(config, source, key_prefix)
        return config


def _check_udp(config: Config, source: str, key_prefix: str) -> None:
    """--udp on must be able to work: TPROXY (UDP has no REDIRECT that keeps the destination), a SOCKS5
    upstream that is not one of ssh's, one process (sessions live in it)."""
    udp = f"{source}{key_prefix}udp on"
    if config.mode != "tproxy":
        raise ConfigError(f"{udp} needs {key_prefix}mode tproxy (UDP keeps its destination only so)")
    if config.ssh:
        raise ConfigError(f"{udp}: ssh -D carries no UDP (it refuses UDP ASSOCIATE)")
    if not config.udp_upstreams:
        raise ConfigError(f"{udp} needs a SOCKS5 upstream that carries UDP ASSOCIATE (such as dante)")
    if config.workers > 1:
        raise ConfigError(f"{udp} needs {key_prefix}workers 1 (a UDP session lives in one process)")


RESOLV_CONF = "/etc/resolv.conf"
MAX_RESOLV_CONF = 65536  # bytes read of it; a resolv.conf is a few lines
RESOLV_CONF_NAMESERVERS = 3  # glibc's MAXNS: the system uses no more than the first three either


def resolv_conf_nameservers(text: str) -> list[DnsUpstream]:
    """The nameservers of a resolv.conf, as udp:// resolvers in order; a line whose address is not an IP is
    skipped, as glibc skips it."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        found.append(DnsUpstream("udp", str(address), DNS_PORTS["udp"]))
        if len(found) == RESOLV_CONF_NAMESERVERS:
            break
    return found


def _is_the_relays_own(upstream: DnsUpstream, service: list[tuple[str, int]]) -> bool:
    """Whether ``upstream`` is an address the relay's own DNS service (--dns) answers on."""
    if upstream.scheme == "https":  # the service answers no DoH
        return False
    host = ipaddress.ip_address(upstream.host)
    for address, port in service:
        listening = ipaddress.ip_address(address)
        if port == upstream.port and (listening == host or (listening.is_unspecified and host.is_loopback)):
            return True
    return False


def local_dns_upstreams(config: Config, resolv_conf: str = RESOLV_CONF) -> list[DnsUpstream]:
    """--dns-local; by default, the nameservers in ``resolv_conf`` but the relay's own --dns (a router that asks
    the relay for its own lookups must not have its local questions sent back to the relay).

    ConfigError when that leaves none, or when a --dns-local is the relay's own --dns: each would ask itself.
    """
    if config.dns_local:
        for number, upstream in enumerate(config.dns_local, 1):
            if _is_the_relays_own(upstream, config.dns):
                raise ConfigError(
                    f"{_which('--dns-local', number, len(config.dns_local))}: {upstream} is this relay's own --dns, "
                    "which would ask itself"
                )
        return config.dns_local
    try:
        with open(resolv_conf, "rb") as file:
            text = file.read(MAX_RESOLV_CONF).decode("utf-8", "replace")
    except OSError as exc:
        raise ConfigError(
            f"cannot read {resolv_conf} for the local DNS resolver: {exc.strerror}; give --dns-local"
        ) from None
    nameservers = resolv_conf_nameservers(text)
    others = [upstream for upstream in nameservers if not _is_the_relays_own(upstream, config.dns)]
    if not others:
        what = "only this relay's own --dns" if nameservers else "no nameserver"
        raise ConfigError(
            f"{resolv_conf} names {what}: give the LAN's resolver with --dns-local udp://IP "
            "(it answers --dns-local-domain and --bypass-domain names and private addresses' PTR)"
        )
    return others


def _check_fake_ip_ranges(networks: list, key_prefix: str) -> None:
    for number, network in enumerate(networks):
        for other in networks[:number]:
            if network.overlaps(other):
                raise ConfigError(f"{key_prefix}fake-ip-range: {network} overlaps {other}")


def load_file(path: str) -> dict:
    """The settings in a TOML config file, keyed like the command-line options."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
