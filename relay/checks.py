"""``relay check``'s judgements: each function takes facts gathered from the router (text, numbers)
and says ok, warn or FAIL with what to do. Nothing here touches the system; relay.check_command
gathers the facts."""

import re
from dataclasses import dataclass

from relay.addresses import bracketed

OK, WARN, FAIL = "ok", "warn", "FAIL"
CONNTRACK_WARN, CONNTRACK_FAIL = 0.75, 0.95  # when full, the kernel drops new connections' packets
# iptables targets that end a packet's way through the chain, so a jump after them is never reached.
TERMINAL_TARGETS = ("ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "REDIRECT", "TPROXY", "MASQUERADE")
# nft: in a base chain that runs before ours, these take the packet for good. An accept does not:
# every base chain on a hook sees the packet (a nat chain only until one of them has NATed it).
NFT_TAKING = re.compile(r"\b(drop|reject|dnat|redirect|tproxy)\b")
BASE_CHAIN = re.compile(r"type \w+ hook (\w+) .*priority ([^;]+);(?: policy (\w+);)?")
NFT_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


@dataclass(frozen=True)
class Verdict:
    level: str  # OK, WARN or FAIL
    what: str  # what was checked, a few words
    detail: str  # what was found and, unless ok, what to do

    def line(self) -> str:
        return f"{self.level:<4}  {self.what}: {self.detail}"


def exit_status(verdicts: list[Verdict]) -> int:
    return 1 if any(verdict.level == FAIL for verdict in verdicts) else 0


def running(port: int, owners: list[tuple[int, str]]) -> Verdict:
    """``owners``: (pid, command line) of each process with a listening TCP socket on the relay's port."""
    what = "relay running"
    if not owners:
        return Verdict(FAIL, what, f"nothing listens on port {port}: start it with this config (systemctl start relay)")
    strangers = [f"pid {pid} ({command})" for pid, command in owners if "relay" not in command]
    if strangers:
        return Verdict(
            FAIL, what, f"port {port} is held by {', '.join(strangers)}, not relay: stop it or change --listen"
        )
    pids = ", ".join(str(pid) for pid, _ in owners)
    return Verdict(OK, what, f"listening on port {port} (pid {pids})")


METRIC_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric in Prometheus text: (labels, value)."""
    samples = []
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match["name"] == name:
            samples.append((dict(LABEL.findall(match["labels"] or "")), float(match["value"])))
    return samples


def metrics(where: str, text: str | None, error: str | None) -> list[Verdict]:
    """The running relay's metrics endpoint: its answer, and the upstreams it marks unhealthy."""
    what = f"metrics {where}"
    if text is None:
        return [Verdict(FAIL, what, f"no answer ({error}): is relay running with this config?")]
    info = metric_samples(text, "relay_info")
    if not info:
        return [Verdict(FAIL, what, "answers, but not with relay's metrics: another program holds the port")]
    verdicts = [Verdict(OK, what, f"relay {info[0][0].get('version', '?')} answers")]
    for labels, value in metric_samples(text, "relay_upstream_healthy"):
        if value == 0:
            verdicts.append(
                Verdict(
                    WARN,
                    f"upstream {labels.get('upstream', '?')}",
                    "the running relay marks it unhealthy (see its log for why)",
                )
            )
    return verdicts


def rules(backend: str, installed: str | None, expected: str) -> Verdict:
    """``installed``/``expected``: our rules as listed by the firewall (None: none installed), in one form."""
    what = f"rules ({backend})"
    apply = f"run 'relay rules --apply --backend {backend}' with this config"
    if installed is None:
        return Verdict(FAIL, what, f"not installed: {apply}")
    have, want = _lines(installed), _lines(expected)
    if have == want:
        return Verdict(OK, what, "installed as 'relay rules' would install them")
    extra = next((line for line in have if line not in want), None)
    missing = next((line for line in want if line not in have), None)
    found = f"extra: {extra}" if extra else f"missing: {missing}" if missing else "in another order"
    return Verdict(FAIL, what, f"not what 'relay rules' would install for this config ({found}): {apply}")


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def iptables_shadowing(tool: str, table: str, chain_rules: list[str], jump_to: str, lan_ifaces: list[str]) -> Verdict:
    """``chain_rules``: a built-in chain as ``iptables -S`` lists it (``-A PREROUTING ...``), in order.
    Is anything before our first jump taking the LAN's TCP?"""
    chain = chain_rules[0].split()[1] if chain_rules else "PREROUTING"
    what = f"{tool} {table} {chain} order"
    for rule in chain_rules:
        words = rule.split()
        if jump_target(words) == jump_to:
            return Verdict(OK, what, "relay's jump comes before anything that takes the LAN's TCP")
        if jump_target(words) not in TERMINAL_TARGETS or not _may_match_lan_tcp(words, lan_ifaces):
            continue
        delete = f"{tool} -t {table} -D {rule.removeprefix('-A ')}"
        level = FAIL if _unconditional(words) else WARN
        return Verdict(
            level,
            what,
            f"'{rule}' comes before relay's jump, so the LAN's TCP it matches skips the relay: "
            f"move it after ({delete}, then add it again with -A)",
        )
    return Verdict(FAIL, what, f"no jump to {jump_to}: run 'relay rules --apply --backend iptables' with this config")


def jump_target(words: list[str]) -> str | None:
    for option, target in zip(words, words[1:]):
        if option in ("-j", "--jump", "-g", "--goto"):
            return target
    return None


def _option(words: list[str], name: str) -> tuple[bool, str] | None:
    """(negated, value) of an option, or None if the rule does not have it."""
    for index, word in enumerate(words[:-1]):
        if word == name:
            return index > 0 and words[index - 1] == "!", words[index + 1]
    return None


def _may_match_lan_tcp(words: list[str], lan_ifaces: list[str]) -> bool:
    protocol = _option(words, "-p")
    if protocol and (protocol[0] or protocol[1] not in ("tcp", "6", "all")):
        return False
    interface = _option(words, "-i")
    if interface:
        negated, name = interface
        matches = [_iface_matches(name, iface) for iface in lan_ifaces] if lan_ifaces else [name != "lo"]
        return not all(matches) if negated else any(matches)
    return True


def _iface_matches(pattern: str, iface: str) -> bool:
    return iface.startswith(pattern[:-1]) if pattern.endswith("+") else iface == pattern


def _unconditional(words: list[str]) -> bool:
    """No match narrower than protocol and interface: all the LAN's TCP."""
    matches = words[: words.index("-j")] if "-j" in words else words  # what follows -j is the target's
    narrowing = [word for word in matches if word.startswith("-") and word not in ("-A", "-p", "-i", "-m")]
    return not narrowing


def nft_base_chains(ruleset: str) -> list[dict]:
    """Base chains in ``nft list ruleset`` text: family, table, chain, hook, priority, policy, rules."""
    chains, table, chain = [], None, None
    for raw in ruleset.splitlines():
        line = raw.strip()
        if match := re.match(r"table (\w+) (\S+) \{", line):
            table = (match[1], match[2])
        elif match := re.match(r"chain (\S+) \{", line):
            chain = {"family": table[0], "table": table[1], "chain": match[1], "hook": None, "rules": []}
        elif chain is not None and (
            match := re.match(r"type \w+ hook (\w+) .*priority ([^;]+);(?: policy (\w+);)?", line)
        ):
            chain.update(hook=match[1], priority=_nft_priority(match[2].strip()), policy=match[3] or "accept")
        elif line == "}" and chain is not None:
            if chain["hook"]:
                chains.append(chain)
            chain = None
        elif chain is not None and line:
            chain["rules"].append(line)
    return chains


def _nft_priority(text: str) -> int:
    match = re.fullmatch(r"(\w+|-?\d+)\s*(?:([+-])\s*(\d+))?", text)
    if not match:
        return 0
    base = NFT_PRIORITIES.get(match[1])
    value = base if base is not None else int(match[1])
    return value + (int(match[3]) * (1 if match[2] == "+" else -1) if match[2] else 0)


def nft_shadowing(chains: list[dict], our_table: tuple[str, str], hook: str, priority: int) -> Verdict:
    """Base chains of other tables on our hook that run before ours (or with ours) and take packets."""
    what = f"nft {hook} order"
    for chain in chains:
        if (chain["family"], chain["table"]) == our_table or chain["hook"] != hook or chain["priority"] > priority:
            continue
        if chain["family"] not in ("ip", "ip6", "inet"):
            continue
        where = f"table {chain['family']} {chain['table']} chain {chain['chain']} (priority {chain['priority']})"
        if chain["policy"] == "drop":
            return Verdict(
                WARN, what, f"{where} runs before relay's rules with policy drop: check it lets LAN TCP through"
            )
        taking = next((rule for rule in chain["rules"] if NFT_TAKING.search(rule)), None)
        if taking:
            return Verdict(
                WARN,
                what,
                f"{where} runs before relay's rules and may take the LAN's TCP: '{taking}': "
                "make sure it does not match it",
            )
    return Verdict(OK, what, "nothing before relay's rules takes the LAN's TCP")


def tproxy_routing(missing: list[str]) -> Verdict:
    """``missing``: the commands that would add the TPROXY ip rules and routes that are not there."""
    if not missing:
        return Verdict(OK, "TPROXY routing", "the ip rules and local routes are there")
    return Verdict(
        FAIL,
        "TPROXY routing",
        f"missing, so intercepted packets are not delivered to the relay: {'; '.join(missing)} "
        "(or 'relay rules --apply' with this config)",
    )


def forwarding(ipv4: str, ipv6: str, ipv6_needed: bool) -> list[Verdict]:
    """The sysctls' values ("1" on); IPv6 matters where the LAN has IPv6 addresses and it is intercepted."""
    verdicts = [_sysctl_on("net.ipv4.ip_forward", ipv4, "the router does not forward the LAN's traffic")]
    if ipv6_needed:
        verdicts.append(_sysctl_on("net.ipv6.conf.all.forwarding", ipv6, "while the LAN has IPv6"))
    return verdicts


def _sysctl_on(name: str, value: str, why: str) -> Verdict:
    if value == "1":
        return Verdict(OK, name, value)
    return Verdict(
        FAIL, name, f"{value or 'missing'}: {why}: sysctl -w {name}=1 (and {name}=1 in /etc/sysctl.d/ to keep it)"
    )


def ipv6_bypass(addresses: dict[str, list[str]], intercepted: bool) -> Verdict:
    """``addresses``: the LAN interfaces' global IPv6 addresses by interface."""
    what = "IPv6 on the LAN"
    found = [f"{address} on {iface}" for iface, listed in addresses.items() for address in listed]
    if not found:
        return Verdict(OK, what, "no global IPv6 address on the LAN interfaces")
    if intercepted:
        return Verdict(OK, what, f"{found[0]}, and IPv6 TCP is intercepted")
    return Verdict(
        WARN,
        what,
        f"{found[0]} but no IPv6 interception: the LAN's IPv6 TCP goes around the relay: "
        "install the IPv6 rules too ('relay rules --apply') or remove the address",
    )


def quic(udp_reject: str, udp_upstreams: list[str], rules_in_place: bool | None) -> Verdict:
    """What becomes of the LAN's UDP to port 443 (QUIC, HTTP/3) with these options: relayed (``udp_upstreams``,
    their names), rejected by relay's rules (``udp_reject`` quic or all), or neither. Either needs the rules:
    ``rules_in_place`` says whether the rules check found them as expected (None: it could not look)."""
    what = "QUIC (UDP 443) from the LAN"
    if not udp_upstreams and udp_reject == "off":
        return Verdict(
            WARN,
            what,
            "neither relayed nor rejected (--udp-reject off): browsers reach servers around the relay, or wait "
            "seconds where the router drops it, unless the router's own policy rejects it: --udp-reject quic "
            "(the default)",
        )
    if udp_upstreams:
        fate = (
            f"taken by the relay (--udp) through {udp_upstreams[0]}: its UDP line below says if that proxy carries it"
        )
        rules_do = "take it to the relay (--udp)"
    else:
        fate = f"rejected by relay's rules (--udp-reject {udp_reject}): clients fall back to TCP"
        rules_do = f"reject it (--udp-reject {udp_reject})"
    if rules_in_place:
        return Verdict(OK, what, fate)
    if rules_in_place is None:
        return Verdict(OK, what, f"relay's rules {rules_do}, if they are in place (not checked)")
    return Verdict(
        WARN, what, f"relay's rules {rules_do}, but they are not as expected (above): until they are, it goes around"
    )


def conntrack(count: int | None, maximum: int | None) -> Verdict:
    what = "conntrack"
    if count is None or not maximum:
        return Verdict(OK, what, "not in use")
    share = count / maximum
    fix = f"raise it (sysctl -w net.netfilter.nf_conntrack_max={maximum * 2})"
    if share >= CONNTRACK_FAIL:
        return Verdict(FAIL, what, f"{count} of {maximum} entries: new connections are being dropped: {fix}")
    if share >= CONNTRACK_WARN:
        return Verdict(WARN, what, f"{count} of {maximum} entries ({share:.0%}): nearly full: {fix}")
    return Verdict(OK, what, f"{count} of {maximum} entries ({share:.0%})")


def upstream(name: str, target: str, seconds: float | None, reason: str | None, fault: str | None) -> Verdict:
    """A proxy handshake to ``target``: its time, or why and whose fault it failed (relay.net.faults)."""
    what = f"upstream {name}"
    if seconds is not None:
        return Verdict(OK, what, f"opened a tunnel to {target} in {seconds * 1000:.0f} ms")
    if fault == "target":
        return Verdict(
            WARN, what, f"answers, but could not reach {target} ({reason}): try --check-target with a host it can reach"
        )
    return Verdict(
        FAIL, what, f"no tunnel to {target} ({reason}): check that the proxy runs and is reachable from here"
    )


# Debian's squid.conf: Safe_ports below 1025 (1025-65535 are all in it); another port is refused
# by 'http_access deny !Safe_ports' before its SSL_ports rule is read.
DEBIAN_SAFE_PORTS = frozenset({21, 70, 80, 210, 280, 443, 488, 591, 777})


def non_tls_port(name: str, target: str, reason: str | None) -> Verdict:
    """A CONNECT to a port other than 443 (``target``); ``reason``: why it failed, None if it opened."""
    what = f"upstream {name} CONNECT to other ports"
    if reason != "http-403":
        return Verdict(OK, what, f"not refused by the proxy's rules ({target}: {reason or 'opened'})")
    port = int(target.rpartition(":")[2])
    if port in DEBIAN_SAFE_PORTS or port >= 1025:
        fix = f"add 'acl SSL_ports port {port}' to squid.conf (before 'http_access deny CONNECT !SSL_ports')"
    else:  # refused by 'http_access deny !Safe_ports' first
        fix = (
            f"add 'acl Safe_ports port {port}' and 'acl SSL_ports port {port}' to squid.conf "
            "(before 'http_access deny !Safe_ports')"
        )
    return Verdict(
        WARN,
        what,
        f"{target} refused (403): stock squid allows CONNECT only to SSL_ports, so git over ssh "
        f"and other non-443 TLS fail: {fix}",
    )


def ssh_tunnel(description: str, up_seconds: float | None, failure: str | None, without_session=False) -> Verdict:
    """``without_session``: --ssh-session auto gave the session up (the account or sshd allows none)."""
    what = "ssh tunnel"
    if up_seconds is not None and without_session:
        return Verdict(
            WARN,
            what,
            f"{description} up in {up_seconds * 1000:.0f} ms, but without a session ({failure}), so sshd may hold "
            "the far side's small writes for a round trip (Nagle): an account with a shell that allows a session "
            "lets it send at once; --ssh-session off says this is meant",
        )
    if up_seconds is not None:
        return Verdict(OK, what, f"{description} up in {up_seconds * 1000:.0f} ms")
    return Verdict(
        FAIL,
        what,
        f"{description} did not come up: {failure or 'no answer'}: "
        "check --ssh, --ssh-identity and that the far host accepts the key",
    )


def udp_upstream(
    name: str,
    target: str,
    relay_address: tuple[str, int] | None,
    seconds: float | None,
    found: str | None,
    refused: bool = False,
) -> Verdict:
    """A DNS query to ``target`` through the proxy's UDP ASSOCIATE. ``relay_address``: where the proxy said
    to send datagrams, None if it did not associate (``found``: why; ``refused``: by the proxy's answer, not
    for want of reaching it); ``seconds`` until the answer (``found``: its rcode), None if none came
    (``found``: what came instead, if anything)."""
    what = f"upstream {name} UDP"
    if relay_address is None and refused:
        return Verdict(
            FAIL,
            what,
            f"the proxy refused UDP ASSOCIATE ({found}): it must allow it (dante: 'command: udpassociate udpreply' "
            'in a socks pass rule; ssh -D has none), or this upstream must not carry UDP (udp = "off")',
        )
    if relay_address is None:
        return Verdict(FAIL, what, f"no UDP ASSOCIATE ({found}): check that the proxy runs and is reachable from here")
    where = f"{bracketed(relay_address[0])}:{relay_address[1]}"
    if seconds is None:
        return Verdict(
            FAIL,
            what,
            f"associated (relay address {where}), but no answer from {target} came back"
            + (f" (got {found})" if found else "")
            + f": UDP to {where} may be filtered on the way, or the proxy cannot reach {target} "
            "(try --check-udp-target with a DNS server it can reach)",
        )
    return Verdict(
        OK, what, f"a DNS query to {target} answered {found} in {seconds * 1000:.0f} ms (relay address {where})"
    )


def dns(where: str, name: str, seconds: float | None, rcode: str | None, answers: list[str]) -> Verdict:
    """A query for ``name`` to the relay's DNS service at ``where``; rcode None: no answer at all."""
    what = f"DNS {where}"
    if rcode is None:
        return Verdict(FAIL, what, f"no answer for {name}: is relay running with --dns {where}?")
    if rcode != "NOERROR":
        return Verdict(
            FAIL,
            what,
            f"{name}: {rcode}: the DNS upstreams did not answer through the tunnel (see relay's log, --dns-upstream)",
        )
    if not answers:
        return Verdict(WARN, what, f"{name}: no address (try --check-name with a name that has one)")
    return Verdict(OK, what, f"{name} is {answers[0]}, answered in {seconds * 1000:.0f} ms")
