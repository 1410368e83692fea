"""Firewall rules that hand LAN TCP to the relay: iptables, nftables, and TPROXY routing.

Generation is pure: :func:`iptables_restore`, :func:`nft_script` and
:func:`route_commands` turn a :class:`RuleSettings` into text and argv lists.
:func:`apply` and :func:`remove` run them, idempotently and, per tool call,
atomically:

- iptables: our own chains (``RELAY``, and ``RELAY_OUTPUT`` with ``RELAY_OUTPUT_NEW``
  for TPROXY of the router's own traffic) in the ``nat`` (REDIRECT) or ``mangle`` (TPROXY) table,
  with one jump per interface from PREROUTING (and OUTPUT). Each family is one
  ``iptables-restore --noflush`` transaction that also deletes the jumps an
  earlier apply left, so applying twice never duplicates anything.
- nft: everything lives in ``table inet relay``, deleted and created again in
  one ``nft -f`` transaction.
- TPROXY: packets carrying ``tproxy_mark`` are routed to the local host by an
  ``ip rule`` and a ``local`` route in ``route_table``, for IPv4 and IPv6.
- DNS (``dns``, the relay's ``--dns`` addresses): UDP and TCP to port 53
  arriving from the LAN go to the DNS service by NAT (REDIRECT, or DNAT to the
  address it is bound to), in both modes: the service answers from ordinary
  sockets, and only NAT puts the address the client asked back on its replies
  (TPROXY would need a transparent socket replying from that address).
  LAN TCP to port 53 is then left out of the jumps to the relay, whatever the
  order of chains. No destination is exempt: whichever resolver a client asks
  (the router's own dnsmasq included) is covered. The router's own queries
  never pass a LAN interface's PREROUTING, so neither they nor the relay's
  upstream queries are redirected.

Never intercepted, in this order: packets carrying the relay's own mark
(``--mark``, matched under a mask so bits other tools set do not matter),
loopback, the router's own addresses, private and reserved ranges (unless
``exempt_private=False``), and ``exempt``: the upstream proxy's and SSH
server's addresses and the user's ``--bypass`` CIDRs.

Fake-IP mode (``fake_ip_ranges``): TCP to the fake ranges is always
intercepted, before any exemption (they are reserved ranges, and a fake
address means nothing beyond the relay).

UDP (``udp_reject``): the relay carries only TCP, so UDP the LAN sends where
its TCP would be intercepted would go around the tunnel. A filter chain
(``RELAY_UDP``, or ``udp_reject`` in nft), on forwarded LAN UDP (and the
router's own with ``redirect_output``), rejects with an ICMP port
unreachable: UDP to the fake ranges always (a fake address means nothing
without the relay), then, past the same exemptions as the TCP capture, UDP to
port 443 (``quic``: QUIC clients told at once fall back to TCP instead of
waiting seconds for a timeout) or all UDP (``all``); other UDP is left to the
router's own policy (``quic``, ``off``).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass

MODES = ("redirect", "tproxy")
BACKENDS = ("iptables", "nft")
# Far from the small values people pick for --mark (0x1 ... 0xff) and from the
# bits docker/kube-proxy (0x4000, 0x8000) and Tailscale (0xff0000) use.
DEFAULT_TPROXY_MARK = 0x100
DEFAULT_ROUTE_TABLE = 100
RESERVED_ROUTE_TABLES = (253, 254, 255)  # default, main, local

CHAIN = "RELAY"
OUTPUT_CHAIN = "RELAY_OUTPUT"  # TPROXY of the router's own traffic: marks it in mangle OUTPUT
OUTPUT_NEW_CHAIN = "RELAY_OUTPUT_NEW"  # judges the first packet of the router's own connections
DNS_CHAIN = "RELAY_DNS"  # in nat whatever the mode: the LAN's port 53 to the DNS service
UDP_CHAIN = "RELAY_UDP"  # in filter: rejects the LAN's UDP to the fake ranges, and QUIC or all UDP
OUR_CHAINS = (CHAIN, OUTPUT_CHAIN, OUTPUT_NEW_CHAIN, DNS_CHAIN, UDP_CHAIN)
UDP_REJECTS = ("quic", "all", "off")
QUIC_PORT = 443
# A TCP packet that is not a connection's opening SYN (the handshake's last ACK to the relay matches
# the socket rule before this): never the relay's to take.
IPTABLES_MID_STREAM = "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"
NFT_MID_STREAM = "tcp flags & (fin | syn | rst | ack) != syn return"
IPTABLES_TABLES = ("nat", "mangle", "filter")  # where our chains can be: REDIRECT in nat, TPROXY in mangle
NFT_TABLE = "inet relay"

COMMAND_TIMEOUT_SECONDS = 20.0
IPTABLES_LOCK_WAIT_SECONDS = "5"  # less than the command timeout, so a held xtables lock gives its own error
DNS_PORT = 53  # where the LAN's resolvers, whichever they are, are asked

LOOPBACK = {4: ("127.0.0.0/8",), 6: ("::1/128",)}
PRIVATE_AND_RESERVED = {
    4: (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ),
    6: ("::/128", "fc00::/7", "fe80::/10", "ff00::/8"),
}
# What the kernel accepts is wider; this is what is safe to put unquoted into an
# iptables-restore line and quoted into an nft script.
_IFACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class RulesError(Exception):
    """Rules that cannot be generated or installed; the message is one line for the user."""


@dataclass(frozen=True)
class RuleSettings:
    mode: str  # "redirect" or "tproxy"
    port: int  # where the relay listens
    lan_ifaces: tuple[str, ...]  # empty: every interface but lo
    mark: int  # the relay's --mark; its traffic is never intercepted
    exempt: tuple[str, ...] = ()  # addresses/CIDRs never intercepted: proxy, SSH server, --bypass
    redirect_output: bool = False  # intercept the router's own outgoing TCP too
    tproxy_mark: int = DEFAULT_TPROXY_MARK  # TPROXY: packets with this mark are routed to the local host
    route_table: int = DEFAULT_ROUTE_TABLE  # TPROXY: the table holding that local route
    ipv6: bool = True
    exempt_private: bool = True  # never intercept private and reserved destinations
    dns: tuple[tuple[str, int], ...] = ()  # the DNS service's (address, port)s; the LAN's port 53 goes there
    fake_ip_ranges: tuple[str, ...] = ()  # fake-ip mode: TCP there always intercepted, UDP rejected
    udp_reject: str = "off"  # "quic": the LAN's UDP to port 443 rejected where its TCP is intercepted; "all"
    udp: bool = False  # TPROXY the LAN's UDP to the relay too (it carries it through SOCKS5 UDP ASSOCIATE)

    def __post_init__(self):
        if self.mode not in MODES:
            raise RulesError(f"unknown mode {self.mode!r} (use redirect or tproxy)")
        if self.udp_reject not in UDP_REJECTS:
            raise RulesError(f"unknown UDP policy {self.udp_reject!r} (use quic, all or off)")
        if not 0 < self.port < 65536:
            raise RulesError(f"port {self.port} is not in 1-65535")
        for iface in self.lan_ifaces:
            if not _IFACE_NAME.fullmatch(iface):
                raise RulesError(f"invalid interface name {iface!r} (letters, digits, '_', '.', '-'; at most 15)")
        for name, value in (("mark", self.mark), ("TPROXY mark", self.tproxy_mark)):
            if not 0 < value <= 0xFFFFFFFF:
                raise RulesError(f"{name} {value:#x} is not in 0x1-0xffffffff")
        if not 0 < self.route_table <= 0xFFFFFFFF or self.route_table in RESERVED_ROUTE_TABLES:
            raise RulesError(f"route table {self.route_table} is reserved or out of range")
        if self.udp and self.mode != "tproxy":
            raise RulesError("relaying UDP needs mode tproxy (REDIRECT loses a datagram's destination)")
        if self.mode == "tproxy" and self.mark & self.tproxy_mark:
            raise RulesError(
                f"the relay's mark {self.mark:#x} shares bits with the TPROXY mark {self.tproxy_mark:#x}: "
                "its own connections would be routed back to it"
            )
        for text in (*self.exempt, *self.fake_ip_ranges):
            _network(text)
        for host, port in self.dns:
            _dns_address(host, port)
        if self.dns:
            for version in _versions(self):
                _dns_target(self, version)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RulesError(f"invalid address or CIDR {text!r}") from None


def _versions(settings: RuleSettings) -> tuple[int, ...]:
    return (4, 6) if settings.ipv6 else (4,)


def _exempt_networks(settings: RuleSettings, version: int) -> list[str]:
    """Destinations never intercepted, after loopback and local addresses: private ranges, then ``exempt``."""
    networks = list(PRIVATE_AND_RESERVED[version]) if settings.exempt_private else []
    networks += [str(network) for network in map(_network, settings.exempt) if network.version == version]
    return networks


_WILDCARD = {4: "0.0.0.0", 6: "::"}


def _dns_address(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not 0 < port < 65536:
        raise RulesError(f"DNS port {port} is not in 1-65535")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise RulesError(f"invalid DNS service address {host!r}") from None


def _dns_target(settings: RuleSettings, version: int) -> tuple[str | None, int]:
    """Where this family's redirected queries go: (None, port) for REDIRECT to the address they came in
    on, when the service is bound to the wildcard; else (address, port) for DNAT.

    The wildcard wins, then any other address, then loopback: IPv4 reaches it from the LAN only with
    route_localnet (checked on apply), IPv6 not at all.
    """
    candidates = [(_dns_address(host, port), port) for host, port in settings.dns]
    candidates = [(address, port) for address, port in candidates if address.version == version]
    if not candidates:
        raise RulesError(
            f"--dns has no IPv{version} address, so the LAN's DNS over IPv{version} would pass it by: "
            f"add one, such as {_dns_text(_WILDCARD[version], settings.dns[0][1])}"
        )
    address, port = min(candidates, key=lambda candidate: (not candidate[0].is_unspecified, candidate[0].is_loopback))
    if address.is_unspecified:
        return None, port
    if address.version == 6 and address.is_loopback:
        raise RulesError(
            f"--dns {_dns_text(str(address), port)} is on loopback, where the LAN's queries cannot be redirected "
            f"(IPv6 has no route_localnet): bind it to {_dns_text('::', port)} or a LAN address"
        )
    return str(address), port


def _dns_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _fake_ip_networks(settings: RuleSettings, version: int) -> list[str]:
    return [str(network) for network in map(_network, settings.fake_ip_ranges) if network.version == version]


def _mask(value: int) -> str:
    return f"{value:#x}/{value:#x}"


# -- iptables ---------------------------------------------------------------------


@dataclass
class _Table:
    """One iptables table's part of a ruleset: our chains, their rules, and the jumps to them."""

    chains: list[str]
    rules: list[str]
    jumps: list[str]


def _exemption_rules(chain: str, settings: RuleSettings, version: int) -> list[str]:
    return [
        *(f"-A {chain} -d {network} -j RETURN" for network in LOOPBACK[version]),
        f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A {chain} -d {network} -j RETURN" for network in _exempt_networks(settings, version)),
    ]


def _fake_ip_rules(chain: str, settings: RuleSettings, version: int, target: str) -> list[str]:
    """TCP to the fake ranges to ``target``, before the exemptions that would spare these reserved ranges."""
    return [f"-A {chain} -d {network} -p tcp -j {target}" for network in _fake_ip_networks(settings, version)]


def _lan_inputs(settings: RuleSettings) -> list[str]:
    return [f"-i {iface}" for iface in settings.lan_ifaces] or ["! -i lo"]


def _lan_jumps(settings: RuleSettings) -> list[str]:
    tcp = f"-p tcp ! --dport {DNS_PORT}" if settings.dns else "-p tcp"  # port 53 is the DNS service's
    return [f"-A PREROUTING {match} {tcp} -j {CHAIN}" for match in _lan_inputs(settings)]


def _iptables_dns(settings: RuleSettings, version: int) -> _Table:
    """The nat chain sending the LAN's port 53 to the DNS service, and the jumps to it."""
    address, port = _dns_target(settings, version)
    if address is None:
        target = f"REDIRECT --to-ports {port}"
    else:
        target = f"DNAT --to-destination {_dns_text(address, port)}"
    protocols = ("udp", "tcp")
    return _Table(
        [DNS_CHAIN],
        [f"-A {DNS_CHAIN} -p {protocol} -j {target}" for protocol in protocols],
        [
            f"-A PREROUTING {match} -p {protocol} --dport {DNS_PORT} -j {DNS_CHAIN}"
            for match in _lan_inputs(settings)
            for protocol in protocols
        ],
    )


def _udp_table(settings: RuleSettings, version: int) -> _Table:
    """The filter chain rejecting the LAN's UDP (see the module's docstring), and its jumps from FORWARD (and
    OUTPUT)."""
    rules = [f"-A {UDP_CHAIN} -d {network} -j REJECT" for network in _fake_ip_networks(settings, version)]
    if settings.udp_reject != "off":
        port = f" --dport {QUIC_PORT}" if settings.udp_reject == "quic" else ""
        rules += [
            f"-A {UDP_CHAIN} -m mark --mark {_mask(settings.mark)} -j RETURN",
            *_exemption_rules(UDP_CHAIN, settings, version),
            f"-A {UDP_CHAIN} -p udp{port} -j REJECT",
        ]
    jumps = [f"-A FORWARD {match} -p udp -j {UDP_CHAIN}" for match in _lan_inputs(settings)]
    if settings.redirect_output:
        jumps.append(f"-A OUTPUT -p udp -j {UDP_CHAIN}")
    return _Table([UDP_CHAIN], rules, jumps)


def _iptables_ruleset(settings: RuleSettings, version: int) -> dict[str, _Table]:
    """The wanted ruleset of one family, by table."""
    tables = _iptables_tcp(settings, version)
    if settings.dns:
        dns = _iptables_dns(settings, version)
        nat = tables.setdefault("nat", _Table([], [], []))
        nat.chains += dns.chains
        nat.rules += dns.rules
        nat.jumps += dns.jumps
    if _fake_ip_networks(settings, version) or settings.udp_reject != "off":
        tables["filter"] = _udp_table(settings, version)
    return tables


def _iptables_tcp(settings: RuleSettings, version: int) -> dict[str, _Table]:
    """The ruleset handing LAN TCP to the relay, by table."""
    own_mark = f"-m mark --mark {_mask(settings.mark)}"
    if settings.mode == "redirect":
        redirect = f"REDIRECT --to-ports {settings.port}"
        rules = [
            f"-A {CHAIN} {own_mark} -j RETURN",
            # nat sees a connection's first packet only; conntrack takes up one it first sees mid-stream
            # (opened before it ran here) as new: that one is not the relay's to take.
            f"-A {CHAIN} {IPTABLES_MID_STREAM} -j RETURN",
            *_fake_ip_rules(CHAIN, settings, version, redirect),
            *_exemption_rules(CHAIN, settings, version),
            f"-A {CHAIN} -p tcp -j {redirect}",
        ]
        jumps = _lan_jumps(settings)
        if settings.redirect_output:
            jumps.append(f"-A OUTPUT -p tcp -j {CHAIN}")
        return {"nat": _Table([CHAIN], rules, jumps)}

    tproxy_mark = _mask(settings.tproxy_mark)
    tproxy = f"TPROXY --on-port {settings.port} --tproxy-mark {tproxy_mark}"
    rules = [
        f"-A {CHAIN} {own_mark} -j RETURN",
        # Packets of connections the relay already holds: route them to it, skip the rest.
        f"-A {CHAIN} -p tcp -m socket --transparent -j MARK --set-xmark {tproxy_mark}",
        f"-A {CHAIN} -p tcp -m socket --transparent -j ACCEPT",
        # Any other packet but an opening SYN belongs to a connection under way around the relay
        # (opened before the rules): TPROXY would hand it to the listener, which resets it.
        f"-A {CHAIN} {IPTABLES_MID_STREAM} -j RETURN",
        *_fake_ip_rules(CHAIN, settings, version, tproxy),
        *_exemption_rules(CHAIN, settings, version),
        f"-A {CHAIN} -p tcp -j {tproxy}",
        *([f"-A {CHAIN} -p udp -j {tproxy}"] if settings.udp else []),
    ]
    chains, jumps = [CHAIN], _lan_jumps(settings)
    if settings.udp:
        udp = f"-p udp ! --dport {DNS_PORT}" if settings.dns else "-p udp"  # port 53 is the DNS service's
        jumps += [f"-A PREROUTING {match} {udp} -j {CHAIN}" for match in _lan_inputs(settings)]
    if settings.redirect_output:
        # The router's own connections get the TPROXY mark in OUTPUT, so the policy
        # route sends them through lo into PREROUTING, where TPROXY can take them.
        # Only a connection's opening SYN is judged, and the verdict kept in its conntrack
        # mark: a connection opened before the rules, or the answers to one that came in,
        # must never be taken (its next packet would meet the relay's listener: a reset).
        # NEW alone would not do: conntrack takes up a connection it first sees mid-stream
        # (as when the rules are what started it in this namespace) as NEW.
        take = f"CONNMARK --set-xmark {tproxy_mark}"
        opening = "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW"
        chains += [OUTPUT_CHAIN, OUTPUT_NEW_CHAIN]
        rules += [
            f"-A {OUTPUT_CHAIN} {own_mark} -j RETURN",
            f"-A {OUTPUT_CHAIN} {opening} -j {OUTPUT_NEW_CHAIN}",
            f"-A {OUTPUT_CHAIN} -m connmark --mark {tproxy_mark} -j MARK --set-xmark {tproxy_mark}",
            # The relay's answers to intercepted clients carry the server's address, not ours.
            f"-A {OUTPUT_NEW_CHAIN} -m addrtype ! --src-type LOCAL -j RETURN",
            *_fake_ip_rules(OUTPUT_NEW_CHAIN, settings, version, take),
            *_exemption_rules(OUTPUT_NEW_CHAIN, settings, version),
            f"-A {OUTPUT_NEW_CHAIN} -j {take}",
        ]
        jumps += [
            f"-A PREROUTING -i lo -p tcp -m mark --mark {tproxy_mark} -j {CHAIN}",
            f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}",
        ]
    return {"mangle": _Table(chains, rules, jumps)}


def _restore_text(wanted: dict[str, _Table], installed: dict[str, _Table]) -> str:
    """An iptables-restore --noflush script turning ``installed`` (ours, as found) into ``wanted``.

    Declaring a chain (``:NAME - [0:0]``) creates it or, if it exists, flushes it.
    """
    lines = []
    for table in IPTABLES_TABLES:
        want = wanted.get(table, _Table([], [], []))
        have = installed.get(table, _Table([], [], []))
        if not (want.chains or have.chains or have.jumps):
            continue
        stale = [chain for chain in have.chains if chain not in want.chains]
        lines += [
            f"*{table}",
            *(f":{chain} - [0:0]" for chain in want.chains),
            *("-D" + jump.removeprefix("-A") for jump in have.jumps),
            *(f"-F {chain}" for chain in stale),
            *(f"-X {chain}" for chain in stale),
            *want.rules,
            *want.jumps,
            "COMMIT",
        ]
    return "\n".join(lines) + "\n" if lines else ""


def iptables_restore(settings: RuleSettings, family: int) -> str:
    """The ruleset for ``iptables-restore --noflush`` (family 4) or ``ip6tables-restore --noflush`` (6).

    Loading it twice by hand duplicates the jumps; :func:`apply` removes the old ones first.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    return _restore_text(_iptables_ruleset(settings, family), {})


def _iptables_installed(version: int) -> dict[str, _Table]:
    """Our chains and the jumps to them, as they are now."""
    tool = "iptables" if version == 4 else "ip6tables"
    installed = {}
    for table in IPTABLES_TABLES:
        listing = _run([tool, "-w", IPTABLES_LOCK_WAIT_SECONDS, "-t", table, "-S"]).splitlines()
        chains = [line.split()[1] for line in listing if line.startswith("-N ") and line.split()[1] in OUR_CHAINS]
        jumps = [line for line in listing if line.startswith("-A ") and _jumps_to_ours(line)]
        installed[table] = _Table(chains, [], jumps)
    return installed


def _jumps_to_ours(rule: str) -> bool:
    words = shlex.split(rule)
    return words[1] not in OUR_CHAINS and any(
        option in ("-j", "--jump", "-g", "--goto") and target in OUR_CHAINS for option, target in zip(words, words[1:])
    )


def _iptables_update(settings: RuleSettings, install: bool) -> None:
    """One iptables-restore transaction per family: ours as found -> the wanted ruleset (or nothing)."""
    for version in _versions(settings):
        wanted = _iptables_ruleset(settings, version) if install else {}
        script = _restore_text(wanted, _iptables_installed(version))
        if script:
            tool = "iptables-restore" if version == 4 else "ip6tables-restore"
            _run([tool, "-w", IPTABLES_LOCK_WAIT_SECONDS, "--noflush"], stdin=script)


# -- nftables ---------------------------------------------------------------------


def _nft_exemptions(settings: RuleSettings) -> list[str]:
    rules = [f"ip daddr {LOOPBACK[4][0]} return"]
    if settings.ipv6:
        rules.append(f"ip6 daddr {LOOPBACK[6][0]} return")
    rules.append("fib daddr type local return")
    for version, keyword in ((4, "ip"), (6, "ip6")):
        networks = _exempt_networks(settings, version) if version in _versions(settings) else []
        if networks:
            # An anonymous interval set refuses overlapping elements (a --bypass inside 10.0.0.0/8).
            merged = ipaddress.collapse_addresses(map(ipaddress.ip_network, networks))
            rules.append(f"{keyword} daddr {{ {', '.join(map(str, merged))} }} return")
    return rules


def _nft_fake_ip(settings: RuleSettings, statement) -> list[str]:
    """One rule per family with fake ranges: ``statement(keyword)`` (keyword "ip" or "ip6") for their addresses."""
    rules = []
    for version, keyword in ((4, "ip"), (6, "ip6")):
        networks = _fake_ip_networks(settings, version) if version in _versions(settings) else []
        if networks:
            rules.append(f"{keyword} daddr {{ {', '.join(networks)} }} {statement(keyword)}")
    return rules


def _nft_udp(settings: RuleSettings, from_lan: str) -> list[str]:
    """The chains rejecting the LAN's UDP (see the module's docstring)."""
    udp = "meta l4proto udp" if settings.ipv6 else "meta nfproto ipv4 meta l4proto udp"
    body = _nft_chain(
        "udp_reject",
        [f"{from_lan} {udp} jump reject_udp"],
        "type filter hook forward priority filter; policy accept;",
    )
    if settings.redirect_output:
        body += _nft_chain(
            "udp_reject_output", [f"{udp} jump reject_udp"], "type filter hook output priority filter; policy accept;"
        )
    rules = _nft_fake_ip(settings, lambda _: "reject")
    if settings.udp_reject != "off":
        port = f"udp dport {QUIC_PORT} " if settings.udp_reject == "quic" else ""
        rules += [
            f"meta mark & {settings.mark:#x} == {settings.mark:#x} return",
            *_nft_exemptions(settings),
            f"{port}reject",
        ]
    return body + _nft_chain("reject_udp", rules)


def _nft_chain(name: str, rules: list[str], hook: str = "") -> list[str]:
    return [f"\tchain {name} {{", *(f"\t\t{line}" for line in ([hook] if hook else []) + rules), "\t}"]


def _nft_table_body(settings: RuleSettings) -> list[str]:
    own_mark = f"meta mark & {settings.mark:#x} == {settings.mark:#x} return"
    lan = ", ".join(f'"{iface}"' for iface in settings.lan_ifaces)
    from_lan = f"iifname {{ {lan} }}" if lan else 'iifname != "lo"'
    # Without IPv6, the inet table must leave IPv6 alone.
    tcp = "meta l4proto tcp" if settings.ipv6 else "meta nfproto ipv4 meta l4proto tcp"
    lan_tcp = f"{from_lan} {tcp}" + (f" tcp dport != {DNS_PORT}" if settings.dns else "")  # 53: the DNS service's
    port = settings.port
    dns = _nft_dns_chain(settings, from_lan) if settings.dns else []
    udp = _nft_udp(settings, from_lan) if _nft_fake_ip(settings, str) or settings.udp_reject != "off" else []

    if settings.mode == "redirect":
        body = _nft_chain(
            "prerouting",
            [f"{lan_tcp} jump intercept"],
            "type nat hook prerouting priority dstnat; policy accept;",
        )
        if settings.redirect_output:
            # -100 is dstnat; nft 1.0.6 accepts the name only for prerouting.
            body += _nft_chain(
                "output", [f"{tcp} jump intercept"], "type nat hook output priority -100; policy accept;"
            )
        redirect = f"meta l4proto tcp redirect to :{port}"
        fake_ips = _nft_fake_ip(settings, lambda _: redirect)
        intercept = [own_mark, NFT_MID_STREAM, *fake_ips, *_nft_exemptions(settings), redirect]
        return body + _nft_chain("intercept", intercept) + dns + udp

    set_mark = f"meta mark set meta mark | {settings.tproxy_mark:#x}"
    has_mark = f"meta mark & {settings.tproxy_mark:#x} == {settings.tproxy_mark:#x}"
    tproxy = [f"meta nfproto ipv4 meta l4proto tcp tproxy ip to :{port} {set_mark} accept"]
    if settings.ipv6:
        tproxy.append(f"meta nfproto ipv6 meta l4proto tcp tproxy ip6 to :{port} {set_mark} accept")
    prerouting = [f"{lan_tcp} jump intercept"]
    udp_tproxy = []
    if settings.udp:
        lan_udp = f"{from_lan} " + ("meta l4proto udp" if settings.ipv6 else "meta nfproto ipv4 meta l4proto udp")
        prerouting.append(lan_udp + (f" udp dport != {DNS_PORT}" if settings.dns else "") + " jump intercept_udp")
        udp_tproxy = _nft_chain(
            "intercept_udp",
            [own_mark, *_nft_exemptions(settings), *(rule.replace("l4proto tcp", "l4proto udp") for rule in tproxy)],
        )
    if settings.redirect_output:
        prerouting.append(f'iifname "lo" {has_mark} {tcp} jump intercept')
    body = _nft_chain("prerouting", prerouting, "type filter hook prerouting priority mangle; policy accept;")
    if settings.redirect_output:
        # Same scheme as iptables: mark in OUTPUT ("type route" reroutes), TPROXY after lo.
        body += _nft_chain(
            "output", [f"{tcp} jump mark_output"], "type route hook output priority mangle; policy accept;"
        )
        # Only a connection's opening SYN is judged (see the iptables ruleset), its verdict kept in its ct mark.
        take = f"ct mark set ct mark | {settings.tproxy_mark:#x}"
        body += _nft_chain(
            "mark_output",
            [
                own_mark,
                "tcp flags & (fin | syn | rst | ack) == syn ct state new jump take_output",
                f"ct mark & {settings.tproxy_mark:#x} == {settings.tproxy_mark:#x} {set_mark}",
            ],
        )
        body += _nft_chain(
            "take_output",
            [
                "fib saddr type != local return",  # the relay's answers to intercepted clients
                *_nft_fake_ip(settings, lambda _: f"meta l4proto tcp {take} return"),
                *_nft_exemptions(settings),
                take,
            ],
        )
    fake_ips = _nft_fake_ip(settings, lambda keyword: f"meta l4proto tcp tproxy {keyword} to :{port} {set_mark} accept")
    return (
        body
        + _nft_chain(
            "intercept",
            [
                own_mark,
                f"socket transparent 1 {set_mark} accept",  # connections the relay already holds
                NFT_MID_STREAM,  # connections under way around the relay (see the iptables ruleset)
                *fake_ips,
                *_nft_exemptions(settings),
                *tproxy,
            ],
        )
        + udp_tproxy
        + dns
        + udp
    )


def _nft_dns_chain(settings: RuleSettings, from_lan: str) -> list[str]:
    """The LAN's UDP and TCP to port 53, to the DNS service: NAT in both modes (see the module's docstring)."""
    rules = []
    for version in _versions(settings):
        address, port = _dns_target(settings, version)
        family = "ip" if version == 4 else "ip6"
        nat = f"redirect to :{port}" if address is None else f"dnat {family} to {_dns_text(address, port)}"
        rules.append(f"{from_lan} meta nfproto ipv{version} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} {nat}")
    return _nft_chain("dns", rules, "type nat hook prerouting priority dstnat; policy accept;")


def _nft_delete_script() -> str:
    # Declaring the table first makes the delete succeed when it does not exist yet.
    return f"table {NFT_TABLE}\ndelete table {NFT_TABLE}\n"


def nft_script(settings: RuleSettings) -> str:
    """The ruleset for ``nft -f``: replaces ``table inet relay`` in one transaction."""
    return _nft_delete_script() + "\n".join([f"table {NFT_TABLE} {{", *_nft_table_body(settings), "}", ""])


# -- TPROXY routing ----------------------------------------------------------------


def route_parts(settings: RuleSettings, version: int) -> tuple[list[str], list[str], list[str]]:
    """(ip rule selector, ip route spec, ip route show selector for that route)."""
    table = str(settings.route_table)
    everything = "0.0.0.0/0" if version == 4 else "::/0"
    rule = ["fwmark", _mask(settings.tproxy_mark), "lookup", table]
    route = ["local", everything, "dev", "lo", "table", table]
    route_query = ["table", table, "exact", everything, "type", "local", "dev", "lo"]
    return rule, route, route_query


def route_commands(settings: RuleSettings, action: str) -> list[list[str]]:
    """The ``ip rule`` / ``ip route`` commands TPROXY needs (action "add"), or that undo them ("del").

    Empty for REDIRECT. The route is added with ``replace`` so running the commands twice is harmless.
    """
    if action not in ("add", "del"):
        raise ValueError(f"action must be 'add' or 'del', not {action!r}")
    if settings.mode != "tproxy":
        return []
    commands = []
    for version in _versions(settings):
        rule, route, _ = route_parts(settings, version)
        commands.append(["ip", f"-{version}", "rule", action, *rule])
        commands.append(["ip", f"-{version}", "route", "replace" if action == "add" else "del", *route])
    return commands


def _apply_routes(settings: RuleSettings) -> None:
    for version in _versions(settings):
        rule, route, _ = route_parts(settings, version)
        # "ip rule add" happily adds the same rule twice.
        if not _run(["ip", f"-{version}", "rule", "show", *rule]).strip():
            _run(["ip", f"-{version}", "rule", "add", *rule])
        _run(["ip", f"-{version}", "route", "replace", *route])


def _remove_routes(settings: RuleSettings) -> None:
    for version in _versions(settings):
        rule, route, route_query = route_parts(settings, version)
        for _ in _run(["ip", f"-{version}", "rule", "show", *rule]).splitlines():
            _run(["ip", f"-{version}", "rule", "del", *rule])
        # A table without routes does not exist, and asking for it fails.
        if _run(["ip", f"-{version}", "route", "show", *route_query], check=False).strip():
            _run(["ip", f"-{version}", "route", "del", *route])


# -- applying --------------------------------------------------------------------


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command; its stdout, or RulesError with its first line of complaint."""
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise RulesError(f"{argv[0]} not found (is it installed and on PATH?)") from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{shlex.join(argv)} did not finish within {COMMAND_TIMEOUT_SECONDS:g} s") from None
    if check and result.returncode != 0:
        complaint = next((line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()), "")
        raise RulesError(f"{shlex.join(argv)} failed (exit status {result.returncode}): {complaint or 'no message'}")
    return result.stdout if result.returncode == 0 else ""


def _sysctl(*path: str) -> str:
    """A sysctl's value from /proc/sys (path parts, as interface names may hold dots); "" if it is not there."""
    try:
        with open("/proc/sys/" + "/".join(path)) as file:
            return file.read().strip()
    except FileNotFoundError:
        return ""


def _loopback_dns(settings: RuleSettings) -> str | None:
    """The DNS service's IPv4 address:port when it is on loopback: the kernel drops the LAN's queries
    DNATed there as martians unless route_localnet is on for the interface they came in on."""
    if not settings.dns:
        return None
    address, port = _dns_target(settings, 4)
    return _dns_text(address, port) if address and ipaddress.ip_address(address).is_loopback else None


def _route_localnet_commands(ifaces: tuple[str, ...]) -> str:
    # sysctl takes "/" for a dot inside a name (eth0.10).
    return "; ".join(f"sysctl -w net.ipv4.conf.{iface.replace('.', '/')}.route_localnet=1" for iface in ifaces)


def _check_dns_reachable(settings: RuleSettings) -> None:
    loopback = _loopback_dns(settings)
    if loopback is None:
        return
    ifaces = settings.lan_ifaces or ("all",)  # every interface: only "all" covers them all
    if _sysctl("net", "ipv4", "conf", "all", "route_localnet") == "1":
        return
    missing = tuple(iface for iface in ifaces if _sysctl("net", "ipv4", "conf", iface, "route_localnet") != "1")
    if missing:
        raise RulesError(
            f"--dns {loopback} is on loopback, which the LAN's queries reach only with route_localnet "
            f"({_route_localnet_commands(missing)}; it opens the router's other loopback services to the LAN "
            "too): better bind --dns to 0.0.0.0 or a LAN address"
        )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise RulesError(f"unknown firewall backend {backend!r} (use iptables or nft)")


def apply(settings: RuleSettings, backend: str) -> None:
    """Install the routes, then the rules (replacing whatever an earlier apply installed)."""
    _check_backend(backend)
    _check_dns_reachable(settings)
    if settings.mode == "tproxy":
        _apply_routes(settings)  # first: until a rule marks packets, the route is unused
    if backend == "nft":
        _run(["nft", "-f", "-"], stdin=nft_script(settings))
    else:
        _iptables_update(settings, install=True)


def remove(settings: RuleSettings, backend: str) -> None:
    """Remove what :func:`apply` installed; nothing else, and nothing at all if it is not there.

    Our chains go from both nat and mangle, whichever mode installed them; the
    ``ip rule``/route are named by numbers, not ours alone, so only mode tproxy removes them.
    """
    _check_backend(backend)
    if backend == "nft":
        _run(["nft", "-f", "-"], stdin=_nft_delete_script())
    else:
        _iptables_update(settings, install=False)
    if settings.mode == "tproxy":
        _remove_routes(settings)


def describe(settings: RuleSettings, backend: str) -> str:
    """Everything :func:`apply` would install, as text for people (``relay rules``)."""
    _check_backend(backend)
    if backend == "nft":
        parts = ["# nft -f - (replaces table inet relay)", nft_script(settings).rstrip("\n")]
    else:
        parts = []
        for version in _versions(settings):
            tool = "iptables-restore" if version == 4 else "ip6tables-restore"
            parts += [f"# {tool} --noflush", iptables_restore(settings, version).rstrip("\n")]
    loopback = _loopback_dns(settings)
    if loopback:
        ifaces = settings.lan_ifaces or ("all",)
        parts.append(f"# --dns {loopback} is on loopback: needs {_route_localnet_commands(ifaces)}")
    commands = route_commands(settings, "add")
    if commands:
        parts += [
            "# TPROXY routing: packets with the TPROXY mark go to the local host",
            *(shlex.join(command) for command in commands),
        ]
    return "\n".join(parts) + "\n"
