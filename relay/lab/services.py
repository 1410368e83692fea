"""The real Debian daemons (squid, danted, unbound, dnsmasq, sshd, ssh) running inside a :class:`Lab`.

Each ``start_*`` function writes its configuration under ``lab.tmpdir``, starts
the daemon in the foreground inside a namespace, waits until it accepts TCP
connections and returns a handle; the lab stops it at teardown.

``start_dante`` with ``auth`` creates or updates a local Unix user (named
``relaylab...``) with the given password: it modifies /etc/passwd and
/etc/shadow of the machine running the tests.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from relay.addresses import bracketed, format_address
from relay.lab.netns import ADDR, Lab, LabError

Endpoint = tuple[str, int]
# One (address, port) or several.
Endpoints = Endpoint | Sequence[Endpoint]

START_TIMEOUT_SECONDS = 15.0
LAB_USER_PREFIX = "relaylab"

# How the hosts on the client's side reach each host: the address on its
# interface toward the client (for far: the one the router can reach).
HOST_ADDRESS4 = {"client": ADDR.client4, "router": ADDR.router_lan4, "far": ADDR.far4, "server": ADDR.server4}


def _endpoints(listen: Endpoints) -> list[Endpoint]:
    if len(listen) == 2 and isinstance(listen[0], str):
        return [listen]  # type: ignore[list-item]
    return list(listen)  # type: ignore[arg-type]


def _bracketed(address: str) -> str:
    return bracketed(address)


@dataclass
class Service:
    """A daemon the lab started; it can be stopped, killed and started again."""

    lab: Lab
    host: str
    name: str
    argv: list[str]
    ready: Endpoint  # where it accepts connections once it is up, seen from ``host``

    def start(self) -> None:
        self._refuse_a_taken_port()
        self.lab.spawn(self.host, self.argv, name=self.name)
        try:
            self.lab.wait_tcp(self.host, *self.ready, timeout=START_TIMEOUT_SECONDS, name=self.name)
        except BaseException:
            self.kill()  # so that start() can be tried again
            raise

    def _refuse_a_taken_port(self) -> None:
        """Something already accepting where this one will listen (a service an earlier test left running)
        would pass the readiness check and answer in its place."""
        try:
            self.lab.connect(self.host, *self.ready, timeout=1.0).close()
        except OSError:
            return
        raise LabError(f"{self.name}: {self.ready[0]}:{self.ready[1]} in {self.host} is taken already")

    def stop(self) -> None:
        """Ask it to exit (SIGTERM), SIGKILL after 3 s."""
        self.lab.stop(self.name)

    def kill(self) -> None:
        """SIGKILL it and its process group: an abrupt failure."""
        self.lab.kill(self.name)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.lab.process(self.name).poll() is None

    def log_text(self) -> str:
        return self.lab.log_text(self.name)


def _service_dir(lab: Lab, name: str) -> Path:
    if lab.tmpdir is None:
        raise LabError("the lab is not running")
    directory = lab.tmpdir / name
    directory.mkdir()
    return directory


def _stock_conf(path: str, replaced: dict[str, list[str]]) -> str:
    """A Debian config file unchanged but for the directives in ``replaced``: their first line
    becomes the new lines, later ones go; one the file lacks is appended."""
    lines, done = [], set()
    for line in Path(path).read_text().splitlines():
        directive = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else None
        if directive not in replaced:
            lines.append(line)
        elif directive not in done:
            lines.extend(replaced[directive])
            done.add(directive)
    for directive in replaced.keys() - done:
        lines.extend(replaced[directive])
    return "\n".join([*lines, ""])


# -- squid ---------------------------------------------------------------------


class SquidLogEntry(NamedTuple):
    client: str  # the address squid saw the request come from
    result: str  # e.g. "TCP_TUNNEL/200", "TCP_DENIED/403"
    method: str  # e.g. "CONNECT"
    url: str  # for CONNECT: "host:port"
    peer: str  # e.g. "HIER_DIRECT/10.77.3.2"; "HIER_NONE/-" if it never connected


@dataclass(kw_only=True)
class Squid(Service):
    listen: list[Endpoint]
    access_log_path: Path

    def access_log(self) -> list[SquidLogEntry]:
        """Finished transactions so far (squid logs a CONNECT when the tunnel closes)."""
        if not self.access_log_path.exists():
            return []
        entries = []
        for line in self.access_log_path.read_text(errors="replace").splitlines():
            # native format: time elapsed client result bytes method url user peer type
            fields = line.split()
            if len(fields) >= 9:
                entries.append(SquidLogEntry(fields[2], fields[3], fields[5], fields[6], fields[8]))
        return entries

    def connect_targets(self) -> list[str]:
        """The "host:port" of every CONNECT that squid actually opened."""
        return [
            entry.url
            for entry in self.access_log()
            if entry.method == "CONNECT" and not entry.peer.startswith("HIER_NONE")
        ]


# What README tells operators to add, so that a name the far side resolves to its own
# loopback or link-local addresses does not reach the proxy's machine itself.
SQUID_DENY_OWN_MACHINE = (
    "acl to_linklocal dst 169.254.0.0/16 fe80::/10",
    "http_access deny to_localhost",
    "http_access deny to_linklocal",
)
DANTE_DENY_OWN_MACHINE = (
    "socks block { from: 0.0.0.0/0 to: 127.0.0.0/8 }",
    "socks block { from: 0.0.0.0/0 to: 169.254.0.0/16 }",
    "socks block { from: ::/0 to: ::1/128 }",
)


def _squid_own_conf(listen: list[Endpoint], deny_own_machine: bool = False) -> str:
    return "\n".join(
        [
            *(f"http_port {_bracketed(address)}:{port}" for address, port in listen),
            *(SQUID_DENY_OWN_MACHINE if deny_own_machine else ()),
            "http_access allow all",
            "cache deny all",
            "pinger_enable off",  # no ICMP helper process
            # Without DNS in the namespace squid cannot look up a name for itself.
            "visible_hostname relaylab",
            "",
        ]
    )


def _squid_debian_conf(listen: list[Endpoint]) -> str:
    """/etc/squid/squid.conf unchanged but for the port it listens on."""
    return _stock_conf(
        "/etc/squid/squid.conf",
        {
            "http_port": [f"http_port {_bracketed(address)}:{port}" for address, port in listen],
            "coredump_dir": [],  # set by start_squid, to a private directory
            "visible_hostname": ["visible_hostname relaylab"],
        },
    )


# README's squid.conf lines: the first lets squid 5 forward a WebSocket upgrade (stock squid drops
# the Upgrade header; clients send "Upgrade: websocket", and squid compares the name
# case-sensitively); the others let CONNECT reach port 22 (git over ssh), which Debian's rules
# refuse twice: not a Safe_ports port, not an SSL_ports one.
SQUID_OPENINGS = [
    "http_upgrade_request_protocols websocket allow all",
    "acl Safe_ports port 22",
    "acl SSL_ports port 22",
]


def start_squid(
    lab: Lab,
    host: str = "far",
    listen: Endpoints = (("127.0.0.1", 3128),),
    debian_default_conf: bool = False,
    name: str = "squid",
    deny_own_machine: bool = False,
    openings: bool = False,
    extra: Sequence[str] = (),
) -> Squid:
    """Squid 5 (``squid -N``) on ``listen``.

    By default with its own permissive config (any CONNECT allowed, no cache).
    ``debian_default_conf=True`` keeps Debian's rules instead, i.e. only
    localhost may use it and CONNECT is refused except to port 443.
    ``deny_own_machine``: with README's lines that keep clients off squid's own loopback.
    ``openings``: with README's lines that let ws:// upgrades and CONNECT to port 22 through.
    ``extra``: more squid.conf lines, e.g. shorter timeouts.
    """
    endpoints = _endpoints(listen)
    directory = _service_dir(lab, name)
    shutil.chown(directory, "proxy", "proxy")  # squid writes its logs after dropping to "proxy"
    rules = _squid_debian_conf(endpoints) if debian_default_conf else _squid_own_conf(endpoints, deny_own_machine)
    if openings:  # ahead of the http_access lines that use the ACLs
        rules = "\n".join(SQUID_OPENINGS) + "\n" + rules
    access_log = directory / "access.log"
    conf = directory / "squid.conf"
    conf.write_text(
        rules
        + "\n".join(
            [
                # Private files, so that labs (and squids in one lab) never share state.
                f"pid_filename {directory}/squid.pid",
                f"access_log stdio:{access_log}",
                f"cache_log {directory}/cache.log",
                f"coredump_dir {directory}",
                "netdb_filename none",
                # Keep any lookup inside the namespace instead of the host's resolvers.
                "dns_nameservers 127.0.0.1",
                "shutdown_lifetime 0 seconds",
                *extra,
                "",
            ]
        )
    )
    squid = Squid(
        lab,
        host,
        name,
        # -n: the service name (letters and digits only) prefixes squid's
        # shared memory segments in /dev/shm; the lab removes them at teardown.
        ["squid", "-N", "-d1", "-n", re.sub(r"[^A-Za-z0-9]", "", lab.prefix + name), "-f", str(conf)],
        ready=endpoints[0],
        listen=endpoints,
        access_log_path=access_log,
    )
    squid.start()
    return squid


# -- TLS in front of a proxy (https:// upstreams) ---------------------------------


@dataclass
class LabCertificates:
    """A CA of the lab's own, the proxy's certificate it signed (names and addresses as given), and a client
    certificate for mutual TLS, signed by a second CA (the one the proxy trusts for clients); PEM files."""

    ca: Path  # what --upstream-ca gets
    key: Path  # the proxy's
    chain: Path
    client_ca: Path  # what the proxy checks client certificates against
    client_cert: Path  # --upstream-cert (chain and key in one file)
    client_key: Path  # --upstream-key


def lab_certificates(lab: Lab, *names: str, directory_name: str = "tls", **validity) -> LabCertificates:
    """Certificates for ``names`` (host names and IP addresses); ``validity``: trustme's ``not_before`` and
    ``not_after`` (datetimes), e.g. for an expired one."""
    import trustme  # a test dependency, as the lab is

    directory = _service_dir(lab, directory_name)
    ca, client_ca = trustme.CA(organization_name="relay lab"), trustme.CA(organization_name="relay lab clients")
    issued = ca.issue_cert(*names, **validity)
    client = client_ca.issue_cert("relay.router.lab")
    files = LabCertificates(*(directory / name for name in ("ca.pem", "server.key", "server.pem", "client-ca.pem",
                                                             "client.pem", "client.key")))  # fmt: skip
    ca.cert_pem.write_to_path(str(files.ca))
    issued.private_key_pem.write_to_path(str(files.key))
    files.chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    client_ca.cert_pem.write_to_path(str(files.client_ca))
    files.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


def start_stunnel(
    lab: Lab,
    listen: Endpoint,
    target: Endpoint,
    certificates: LabCertificates,
    *,
    host: str = "far",
    require_client_cert: bool = False,
    name: str = "stunnel",
    extra: Sequence[str] = (),
) -> Service:
    """stunnel4 on ``host``: TLS on ``listen`` in front of the plain proxy at ``target`` (README's far side);
    ``require_client_cert``: only clients with a certificate from ``certificates.client_ca`` (mutual TLS)."""
    directory = _service_dir(lab, name)
    lines = [
        "foreground = yes",
        "pid =",
        "syslog = no",
        "debug = 4",
        f"[{re.sub(r'[^A-Za-z0-9]', '', name)}]",
        f"accept = {format_address(listen)}",
        f"connect = {format_address(target)}",
        f"cert = {certificates.chain}",
        f"key = {certificates.key}",
    ]
    if require_client_cert:
        lines += [f"CAfile = {certificates.client_ca}", "verifyChain = yes", "requireCert = yes"]
    conf = directory / "stunnel.conf"
    conf.write_text("\n".join([*lines, *extra, ""]))
    service = Service(lab, host, name, ["stunnel4", str(conf)], ready=listen)
    service.start()
    return service


# -- dante ---------------------------------------------------------------------


@dataclass(kw_only=True)
class Dante(Service):
    listen: list[Endpoint]
    auth: tuple[str, str] | None


def ensure_lab_user(user: str, password: str) -> None:
    """Create (if needed) a login-less local user and set its password.

    Only ``relaylab*`` names are accepted so a typo can never reset a real account.
    """
    if not re.fullmatch(LAB_USER_PREFIX + r"[a-z0-9_-]*", user):
        raise ValueError(f"lab users must be named {LAB_USER_PREFIX}..., got {user!r}")
    if subprocess.run(["id", "-u", user], capture_output=True, timeout=10).returncode != 0:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
            capture_output=True,
            timeout=30,
        )
    subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True, capture_output=True, timeout=30)


def start_dante(
    lab: Lab,
    host: str = "far",
    listen: Endpoints = ((ADDR.far4, 1080), (ADDR.far6, 1080)),
    external: str | Sequence[str] = (ADDR.far_server_side4, ADDR.far_server_side6),
    auth: tuple[str, str] | None = None,
    name: str = "dante",
    deny_own_machine: bool = False,
    extra: Sequence[str] = (),
    deny_udp: bool = False,
) -> Dante:
    """Dante's danted SOCKS server, allowing everything (the lab is a closed network).

    ``auth=(user, password)`` requires RFC 1929 username/password checked
    against the system password database (see :func:`ensure_lab_user`).
    ``deny_own_machine``: with README's rules that keep clients off dante's own loopback.
    ``extra``: more danted.conf lines, e.g. shorter timeouts.
    ``deny_udp``: refuse UDP ASSOCIATE (otherwise allowed, like everything else).
    """
    endpoints = _endpoints(listen)
    externals = [external] if isinstance(external, str) else list(external)
    if auth is not None:
        ensure_lab_user(*auth)
    directory = _service_dir(lab, name)
    conf = directory / "danted.conf"
    conf.write_text(
        "\n".join(
            [
                "logoutput: stderr",
                *(f"internal: {address} port = {port}" for address, port in endpoints),
                *(f"external: {address}" for address in externals),
                "clientmethod: none",
                f"socksmethod: {'username' if auth else 'none'}",
                # root reads /etc/shadow to check passwords; everything else runs as nobody.
                "user.privileged: root",
                "user.unprivileged: nobody",
                *extra,  # settings: before the rules
                "client pass { from: 0/0 to: 0/0 }",
                *(DANTE_DENY_OWN_MACHINE if deny_own_machine else ()),
                *(["socks block { from: 0/0 to: 0/0 command: udpassociate }"] if deny_udp else []),
                "socks pass { from: 0/0 to: 0/0 }",
                "",
            ]
        )
    )
    dante = Dante(
        lab,
        host,
        name,
        ["danted", "-f", str(conf), "-p", str(directory / "danted.pid")],
        ready=endpoints[0],
        listen=endpoints,
        auth=auth,
    )
    dante.start()
    return dante


# -- unbound ---------------------------------------------------------------------

# The lab's names: what unbound answers from local-data, never looking anything up outside.
LAB_ZONE = "example."
LAB_DNS_DATA = {
    "far-only.example.": [("A", ADDR.server4), ("AAAA", ADDR.server6)],
    "server.example.": [("A", ADDR.server4)],
    # A domestic CDN's name: the LAN's own resolver answers it otherwise (split resolution, --bypass-domain).
    "cdn.domestic.example.": [("A", ADDR.server4)],
}


@dataclass(kw_only=True)
class Unbound(Service):
    address: str  # where it serves DNS (UDP and TCP 53) and DoH (HTTPS, HTTP/2)
    direct_address: str  # where the router reaches its plain DNS without a proxy
    https_port: int
    ca_file: Path  # the lab CA that signed its certificate: what --dns-ca gets

    @property
    def doh_url(self) -> str:
        return f"https://{_bracketed(self.address)}:{self.https_port}/dns-query"


def _lab_certificate(directory: Path, addresses: Sequence[str]) -> tuple[Path, Path, Path]:
    """A CA of the lab's own and a certificate it signed for ``addresses`` (IP SANs): (ca, key, chain)."""
    import trustme  # a test dependency, as the lab is

    ca = trustme.CA(organization_name="relay lab")
    issued = ca.issue_cert(*addresses)
    ca_file, key_file, chain_file = directory / "ca.pem", directory / "server.key", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.private_key_pem.write_to_path(str(key_file))
    chain_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return ca_file, key_file, chain_file


def start_unbound(
    lab: Lab,
    host: str = "far",
    address: str = ADDR.far_server_side4,
    direct_address: str = ADDR.far4,
    https_port: int = 443,
    data: dict[str, list[tuple[str, str]]] | None = None,
    name: str = "unbound",
    wildcards: dict[str, list[tuple[str, str]]] | None = None,
    ttl: int = 60,
) -> Unbound:
    """unbound answering the lab's names (``data``, by default LAB_DNS_DATA) over UDP and TCP 53 and
    DoH (HTTP/2 on ``https_port``) at ``address``, and plain DNS at ``direct_address`` too.

    ``wildcards`` maps a zone under example. to its records: every name in that zone, however
    new, gets them (a redirect zone), which is how a benchmark asks a fresh name each time.
    ``ttl`` is every record's.

    It recurses nowhere: names under example. that it does not hold are
    NXDOMAIN (with the zone's SOA), anything else is REFUSED. Its certificate
    names both addresses; the lab CA's file is ``ca_file``. By default it
    listens on far's server-side address, which the proxies reach and the
    router does not: DNS over TCP and DoH can only get there through them.
    """
    directory = _service_dir(lab, name)
    ca_file, key_file, chain_file = _lab_certificate(directory, [address, direct_address])
    records = data if data is not None else LAB_DNS_DATA
    conf = directory / "unbound.conf"
    conf.write_text(
        "\n".join(
            [
                "server:",
                f'    directory: "{directory}"',
                f'    pidfile: "{directory}/unbound.pid"',
                '    username: ""',
                '    chroot: ""',
                "    use-syslog: no",
                '    logfile: ""',
                "    verbosity: 1",
                "    log-queries: yes",  # a test can tell which names reached the far side
                "    num-threads: 1",
                f"    interface: {address}@53",
                f"    interface: {address}@{https_port}",
                f"    interface: {direct_address}@53",
                f"    https-port: {https_port}",
                f'    tls-service-key: "{key_file}"',
                f'    tls-service-pem: "{chain_file}"',
                "    access-control: 0.0.0.0/0 allow",
                "    access-control: ::/0 allow",
                '    module-config: "iterator"',  # no DNSSEC validation: no trust anchor in the lab
                '    local-zone: "." refuse',
                f'    local-zone: "{LAB_ZONE}" static',
                f'    local-data: "{LAB_ZONE} 3600 IN SOA ns.{LAB_ZONE} hostmaster.{LAB_ZONE} 1 3600 600 86400 60"',
                *(
                    f'    local-data: "{owner} {ttl} IN {rrtype} {value}"'
                    for owner, entries in records.items()
                    for rrtype, value in entries
                ),
                *(
                    line
                    for zone, entries in (wildcards or {}).items()
                    for line in (
                        f'    local-zone: "{zone}" redirect',
                        *(f'    local-data: "{zone} {ttl} IN {rrtype} {value}"' for rrtype, value in entries),
                    )
                ),
                "remote-control:",
                "    control-enable: no",
                "",
            ]
        )
    )
    unbound = Unbound(
        lab,
        host,
        name,
        ["unbound", "-d", "-c", str(conf)],
        ready=(address, 53),  # a bare TCP connect to the DoH port would log a failed TLS handshake
        address=address,
        direct_address=direct_address,
        https_port=https_port,
        ca_file=ca_file,
    )
    unbound.start()
    return unbound


# -- dnsmasq ---------------------------------------------------------------------


@dataclass(kw_only=True)
class Dnsmasq(Service):
    address: str  # where it serves DNS, UDP and TCP 53

    def asked(self) -> list[str]:
        """The names it was asked about so far, in order (from its --log-queries lines)."""
        return re.findall(r" query\[\w+\] (\S+) from ", self.log_text())


def start_dnsmasq(
    lab: Lab, records: dict[str, str], host: str = "client", address: str = ADDR.client4, name: str = "dnsmasq"
) -> Dnsmasq:
    """dnsmasq answering ``records`` (name -> address: its A or AAAA, and the address's PTR back to the name) on
    ``address``, as a LAN's own resolver would; it forwards nothing, and refuses any other name."""
    directory = _service_dir(lab, name)
    dnsmasq = Dnsmasq(
        lab,
        host,
        name,
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # none of the machine's configuration
            "--no-resolv",
            "--no-hosts",
            f"--listen-address={address}",
            "--bind-interfaces",
            f"--pid-file={directory}/dnsmasq.pid",
            "--log-facility=-",
            "--log-queries",
            *(f"--host-record={owner},{value}" for owner, value in records.items()),
        ],
        ready=(address, 53),
        address=address,
    )
    dnsmasq.start()
    return dnsmasq


# -- privoxy and tinyproxy ----------------------------------------------------------


def start_privoxy(
    lab: Lab, host: str = "far", listen: Endpoint = ("127.0.0.1", 8118), name: str = "privoxy"
) -> Service:
    """Privoxy with Debian's /etc/privoxy/config (its stock actions and filters), on ``listen``."""
    directory = _service_dir(lab, name)
    conf = directory / "config"
    conf.write_text(
        _stock_conf(
            "/etc/privoxy/config",
            {
                "listen-address": [f"listen-address {_bracketed(listen[0])}:{listen[1]}"],
                "logdir": [f"logdir {directory}"],
            },
        )
    )
    privoxy = Service(lab, host, name, ["privoxy", "--no-daemon", str(conf)], ready=listen)
    privoxy.start()
    return privoxy


def start_tinyproxy(
    lab: Lab, host: str = "far", listen: Endpoint = ("127.0.0.1", 8888), name: str = "tinyproxy"
) -> Service:
    """tinyproxy with Debian's /etc/tinyproxy/tinyproxy.conf (clients from loopback only), on ``listen``."""
    directory = _service_dir(lab, name)
    shutil.chown(directory, "tinyproxy", "tinyproxy")  # it writes its log after dropping to that user
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        _stock_conf(
            "/etc/tinyproxy/tinyproxy.conf",
            {
                "Port": [f"Port {listen[1]}"],
                "Listen": [f"Listen {listen[0]}"],
                "LogFile": [f'LogFile "{directory}/tinyproxy.log"'],
                "PidFile": [f'PidFile "{directory}/tinyproxy.pid"'],
            },
        )
    )
    tinyproxy = Service(lab, host, name, ["tinyproxy", "-d", "-c", str(conf)], ready=listen)
    tinyproxy.start()
    return tinyproxy


# -- sshd and ssh tunnels ----------------------------------------------------------


@dataclass(kw_only=True)
class Sshd(Service):
    address: str  # where ssh clients on the router side connect
    port: int
    client_key: Path  # private key that logs in as root


def _generate_key(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "relaylab", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def start_sshd(lab: Lab, host: str = "far", port: int = 22, name: str = "sshd", settings: tuple[str, ...] = ()) -> Sshd:
    """OpenSSH sshd accepting root by a key made for this lab, forwarding allowed; ``settings``: more
    sshd_config lines."""
    directory = _service_dir(lab, name)
    host_key = directory / "ssh_host_ed25519_key"
    client_key = directory / "client_ed25519"
    _generate_key(host_key)
    _generate_key(client_key)
    authorized_keys = directory / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized_keys)
    conf = directory / "sshd_config"
    conf.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"HostKey {host_key}",
                f"PidFile {directory}/sshd.pid",
                f"AuthorizedKeysFile {authorized_keys}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                # No PAM session in the namespace; tmpdir files are not root-only as StrictModes wants.
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "UseDNS no",
                "PrintMotd no",
                *settings,
                "",
            ]
        )
    )
    # Privilege separation directory, normally made by the systemd unit.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    address = HOST_ADDRESS4[host]
    sshd = Sshd(
        lab,
        host,
        name,
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
        ready=(address, port),
        address=address,
        port=port,
        client_key=client_key,
    )
    sshd.start()
    return sshd


def ssh_argv(sshd: Sshd, *options: str, destination: str | None = None) -> list[str]:
    """An ssh command logging in to ``sshd`` by the lab's key, with none of the machine's configuration or
    known hosts; ``destination`` is root@ its address unless given (a name works too: ssh resolves it)."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(sshd.client_key),
        "-p",
        str(sshd.port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",  # no "Permanently added ..." on every start
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        *options,
        destination or f"root@{sshd.address}",
    ]


@dataclass(kw_only=True)
class SshTunnel(Service):
    sshd: Sshd
    forwards: list[str]


def _first_forward_listener(forwards: Sequence[str]) -> Endpoint:
    """Where ``-L [bind:]port:...`` or ``-D [bind:]port`` listens (ssh binds loopback by default)."""
    for option, spec in zip(forwards, forwards[1:]):
        if option in ("-L", "-D"):
            match = re.match(r"^(?:\[(?P<v6>[^\]]+)\]:|(?P<v4>[^:\[]+):)?(?P<port>\d+)(?::|$)", spec)
            if match:
                return (match["v6"] or match["v4"] or "127.0.0.1", int(match["port"]))
    raise ValueError(f"cannot tell where {list(forwards)} listens; pass wait=(address, port)")


def start_ssh_tunnel(
    lab: Lab,
    sshd: Sshd,
    host: str = "router",
    forwards: Sequence[str] = ("-L", "127.0.0.1:3128:127.0.0.1:3128"),
    wait: Endpoint | None = None,
    name: str = "ssh-tunnel",
) -> SshTunnel:
    """``ssh -N`` from ``host`` to ``sshd`` with the given -L/-D/-R options.

    Waits until ``wait`` (by default the first -L/-D listener) accepts.
    """
    argv = ssh_argv(
        sshd,
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        # Notice a dead far end within ~6 s and exit, as a real tunnel would.
        "-o",
        "ServerAliveInterval=2",
        "-o",
        "ServerAliveCountMax=3",
        *forwards,
    )
    tunnel = SshTunnel(
        lab, host, name, argv, ready=wait or _first_forward_listener(forwards), sshd=sshd, forwards=list(forwards)
    )
    tunnel.start()
    return tunnel


def sshd_across_delay_line(
    lab: Lab, sshd: Sshd, port: int, one_way_ms: float, rate_mbit: float | None = None, name: str = "delay-ssh"
) -> tuple[Sshd, Service]:
    """A delay line on the router's loopback ``port`` in front of ``sshd``, and ``sshd`` as ssh clients on
    the router reach it through that line (for :func:`ssh_argv`, :func:`start_ssh_tunnel`, ``--ssh``)."""
    line = start_delay_line(
        lab, ("127.0.0.1", port), (sshd.address, sshd.port), one_way_ms, rate_mbit=rate_mbit, name=name
    )
    return dataclasses.replace(sshd, address="127.0.0.1", port=port), line


def start_delay_line(
    lab: Lab,
    listen: Endpoint,
    target: Endpoint,
    one_way_ms: float,
    host: str = "router",
    rate_mbit: float | None = None,
    name: str = "delay-line",
) -> Service:
    """A far link's delay (and rate) in front of ``target``: :mod:`relay.lab.delayline` on
    ``host``, listening on ``listen``; what connects there reaches ``target`` one ``one_way_ms``
    later each way."""
    argv = [sys.executable, "-m", "relay.lab.delayline", format_address(listen), format_address(target)]
    argv.append(f"{one_way_ms:g}")
    if rate_mbit is not None:
        argv.append(f"{rate_mbit:g}")
    line = Service(lab, host, name, argv, ready=listen)
    line.start()
    return line


# -- relay itself ----------------------------------------------------------------

_CONN_FIELD = re.compile(r"([\w-]+)=('[^']*'|\"[^\"]*\"|\S+)")


@dataclass(kw_only=True)
class RelayProcess(Service):
    """``python -m relay`` in the lab; ready once it logs that it is listening."""

    log_offset: int = 0  # where this run's output starts in the (appended) log

    def start(self) -> None:
        try:
            self.log_offset = len(self.lab.log_text(self.name))
        except KeyError:  # first run under this name
            self.log_offset = 0
        self.lab.spawn(self.host, self.argv, name=self.name)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while "listening on" not in self.log_text():
            if not self.running or time.monotonic() > deadline:
                self.kill()
                raise LabError(f"relay did not start; its log ends with:\n{self.lab.log_tail(self.name)}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """What this run of the relay has logged."""
        return self.lab.log_text(self.name)[self.log_offset :]

    def wait_for_log(self, text: str, timeout: float = 5.0) -> bool:
        """Whether ``text`` appears in this run's log within ``timeout`` (lines trail what clients see)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def connections(self, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, str]]:
        """The per-connection log lines (``-v``) so far, as dicts of their key=value fields.

        With ``at_least``, wait up to ``timeout`` for that many: a line is
        written after its connection closed, so it may trail what a client saw.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [
                {key: value.strip("'\"") for key, value in _CONN_FIELD.findall(line)}
                for line in self.log_text().splitlines()
                if " relay: conn " in line
            ]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)


def start_relay(
    lab: Lab,
    args: Sequence[str],
    host: str = "router",
    name: str = "relay",
    pure: bool = False,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> RelayProcess:
    """Run the relay from this checkout with ``args`` (plus -v); ``pure`` forces the Python fast path.

    ``wrapper`` runs it under another command, e.g. ``["prlimit", "--nofile=256:256", "--"]``.
    """
    variables = [f"{key}={value}" for key, value in (env or {}).items()]
    argv = ["env", f"RELAY_NO_EXTENSIONS={int(pure)}", *variables, *wrapper, sys.executable, "-m", "relay", "-v", *args]
    relay = RelayProcess(lab=lab, host=host, name=name, argv=argv, ready=("", 0))
    relay.start()
    return relay


def intercept(lab: Lab, mode: str, port: int, host: str = "router", iface: str = ADDR.router_lan_if) -> None:
    """Send every TCP connection arriving on ``iface`` to ``port``, by REDIRECT or TPROXY, v4 and v6."""
    for tables, family in (("iptables", "-4"), ("ip6tables", "-6")):
        if mode == "redirect":
            lab.run(
                host,
                [
                    tables,
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-i",
                    iface,
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    str(port),
                ],
            )
        else:
            lab.run(
                host,
                [
                    tables,
                    "-w",
                    "-t",
                    "mangle",
                    "-A",
                    "PREROUTING",
                    "-i",
                    iface,
                    "-p",
                    "tcp",
                    "-j",
                    "TPROXY",
                    "--on-port",
                    str(port),
                    "--tproxy-mark",
                    "0x1/0x1",
                ],
            )
            lab.run(host, ["ip", family, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"])
            lab.run(host, ["ip", family, "route", "add", "local", "default", "dev", "lo", "table", "100"])


def intercept_dns(lab: Lab, host: str = "router", iface: str = ADDR.router_lan_if) -> None:
    """The LAN's IPv4 DNS (UDP and TCP 53), whichever resolver it names, to port 53 on ``iface``'s own address,
    where the relay's --dns serves (as `relay rules --dns` does). Inserted first: ahead of :func:`intercept`'s
    TCP rule; :func:`clear_interception` removes it."""
    for protocol in ("udp", "tcp"):
        rule = ["-i", iface, "-p", protocol, "--dport", "53"]
        lab.run(host, ["iptables", "-w", "-t", "nat", "-I", "PREROUTING", *rule, "-j", "REDIRECT"])


def clear_interception(lab: Lab, host: str = "router") -> None:
    for tables in ("iptables", "ip6tables"):
        for table in ("nat", "mangle"):
            lab.run(host, [tables, "-w", "-t", table, "-F"])
    for family in ("-4", "-6"):
        lab.run(host, ["ip", family, "rule", "del", "fwmark", "0x1/0x1", "lookup", "100"], check=False)
        lab.run(host, ["ip", family, "route", "flush", "table", "100"], check=False)
