"""``relay check``: gathers facts about this router for a relay configuration and prints the verdicts
of relay.checks, one line each; exit status 1 if any failed."""

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque

import trio

from relay import checks
from relay.addresses import bracketed
from relay.config import DEFAULT_PORT, Config, ConfigError
from relay.logs import log
from relay.metrics import read_conntrack
from relay.options import build_parser, load_config
from relay.rules import (
    CHAIN,
    NFT_TABLE,
    OUR_CHAINS,
    RulesError,
    RuleSettings,
    iptables_restore,
    nft_script,
    route_parts,
)
from relay.rules_command import RULE_OPTIONS, add_rule_options, settings_for

DEFAULT_CHECK_HOST = "cloudflare.com"  # a CDN's name: any proxy that works at all reaches it
DEFAULT_CHECK_TARGET = f"{DEFAULT_CHECK_HOST}:443"
DEFAULT_UDP_CHECK_TARGET = "1.1.1.1:53"  # the same CDN's resolver: answers any proxy's UDP relay
UDP_CHECK_TIMEOUT = 5.0  # for the answer to the UDP check's query, once associated
UDP_CHECK_RESEND = 1.0  # a datagram may be lost either way: the query goes again this often
SESSION_SETTLE = 2.0  # --ssh-session auto: how long a tunnel that came up with a session is watched before judging
NON_TLS_PORT = 22  # what git over ssh needs, and stock squid refuses
COMMAND_TIMEOUT = 20.0
METRICS_TIMEOUT = 3.0
SSH_START_TIMEOUT = 15.0
MAX_DATAGRAM = 65535
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def build_check_parser() -> argparse.ArgumentParser:
    parser = build_parser("relay check")
    parser.description = (
        "Check this router for a relay with these options: the relay running, its firewall rules installed and "
        "first, forwarding, IPv6, QUIC, conntrack, each upstream (through --ssh), UDP through those that carry it "
        "(--udp), and --dns. One line per check: ok, warn or FAIL with what to do; exit status 0 when nothing "
        "failed, 1 otherwise, 2 for bad options."
    )
    add_rule_options(parser, "the rules' backend (default: whichever is installed)")
    parser.add_argument(
        "--check-target",
        metavar="HOST:PORT",
        help=f"where each upstream is asked to open a tunnel (default: {DEFAULT_CHECK_TARGET})",
    )
    parser.add_argument(
        "--check-name",
        metavar="NAME",
        help="the name asked of --dns and through UDP (default: the check target's, if a name)",
    )
    parser.add_argument(
        "--check-udp-target",
        metavar="IP:PORT",
        help="a DNS server each upstream that carries UDP (--udp) is asked to relay a query to "
        f"(default: {DEFAULT_UDP_CHECK_TARGET})",
    )
    return parser


def parse_target(text: str, option: str = "--check-target") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``, HOST a name or an address."""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: expected HOST:PORT")
    return host, int(port)


def check_name(name: str) -> str:
    """``name`` if a DNS query can ask it; raises ConfigError."""
    import dns.exception
    import dns.name

    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"--check-name {name!r}: not a DNS name ({exc})") from None
    return name


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def main(argv: list[str]) -> int:
    args = build_check_parser().parse_args(argv)
    own_options = (*RULE_OPTIONS, "check_target", "check_name", "check_udp_target")
    options = {key: vars(args).pop(key, None) for key in own_options}
    try:
        config = load_config(args)
        target = parse_target(options["check_target"] or DEFAULT_CHECK_TARGET)
        name = check_name(options["check_name"] or (DEFAULT_CHECK_HOST if _is_address(target[0]) else target[0]))
        udp_target = parse_target(options["check_udp_target"] or DEFAULT_UDP_CHECK_TARGET, "--check-udp-target")
        if not _is_address(udp_target[0]):  # a client's datagram always names an address (TPROXY)
            raise ConfigError(f"--check-udp-target {options['check_udp_target']}: give an IP address, not a name")
    except ConfigError as exc:
        print(f"relay check: error: {exc}", file=sys.stderr)
        return 2
    log.disabled = True  # ssh tunnels' restarts are reported as verdicts, not log lines
    verdicts = []

    def say(verdict: checks.Verdict) -> None:
        verdicts.append(verdict)
        print(verdict.line(), flush=True)

    port = _relay_port(config)
    say(checks.running(port, _listeners(port)))
    if config.metrics:
        for worker in range(config.workers):
            host, metrics_port = config.metrics[0], config.metrics[1] + worker
            for verdict in checks.metrics(f"{bracketed(host)}:{metrics_port}", *_scrape(host, metrics_port)):
                say(verdict)
    rules_in_place, ipv6_intercepted = _check_rules(config, options, say)
    lan_v6 = _lan_ipv6(config.lan_iface)
    for verdict in checks.forwarding(
        _sysctl("net/ipv4/ip_forward"), _sysctl("net/ipv6/conf/all/forwarding"), ipv6_intercepted and bool(lan_v6)
    ):
        say(verdict)
    say(checks.ipv6_bypass(lan_v6, ipv6_intercepted))
    say(checks.quic(config.udp_reject, [str(upstream) for upstream in config.udp_upstreams], rules_in_place))
    say(checks.conntrack(*(read_conntrack() or (None, None))))
    trio.run(_network_checks, config, target, udp_target, name, say, strict_exception_groups=True)  # as in Trio >= 0.25
    return checks.exit_status(verdicts)


def _relay_port(config: Config) -> int:
    return config.listen[0][1] if config.listen else DEFAULT_PORT


def _sysctl(path: str) -> str:
    try:
        with open(f"/proc/sys/{path}") as file:
            return file.read().strip()
    except OSError:
        return ""


# -- the relay itself ------------------------------------------------------------


def _listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of each process with a listening TCP socket on ``port`` in this namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    owners.add((int(pid), file.read().replace(b"\0", b" ").decode(errors="replace").strip()))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(owners)


def _scrape(host: str, port: int) -> tuple[str | None, str | None]:
    """The metrics text, or None and why not."""
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        host = "127.0.0.1" if address.version == 4 else "::1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through $http_proxy
    try:
        with opener.open(f"http://{bracketed(host)}:{port}/metrics", timeout=METRICS_TIMEOUT) as answer:
            return answer.read().decode(errors="replace"), None
    except urllib.error.URLError as exc:
        reason = exc.reason
        return None, reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    except OSError as exc:
        return None, exc.strerror or str(exc)


# -- firewall --------------------------------------------------------------------


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _in_scratch_netns(script: str, stdin: str) -> str:
    """``script`` (sh) run in a new, empty network namespace: how the firewall tools themselves list a
    ruleset loaded there, to compare with what is installed here in the same form."""
    result = _run(["unshare", "--net", "sh", "-c", script], stdin)
    if result is None or result.returncode != 0:
        why = result.stderr.strip() if result else "unshare did not run"
        raise RulesError(f"could not list the expected rules in a scratch namespace: {why}")
    return result.stdout


COUNTERS = re.compile(r"\s*counter packets \d+ bytes \d+|^\s*# handle \d+|\[\d+:\d+\]")


def _check_rules(config: Config, options: dict, say) -> tuple[bool | None, bool]:
    """The rules verdicts; whether the rules are as expected (None: not known), and whether IPv6 TCP is
    intercepted."""
    try:
        settings = settings_for(config, bool(options["redirect_output"]), bool(options["keep_private"]))
    except ConfigError as exc:
        say(checks.Verdict(checks.WARN, "rules", f"cannot tell which rules this config needs: {exc}"))
        return None, False
    if os.geteuid() != 0:
        say(checks.Verdict(checks.WARN, "rules", "not checked: reading the firewall needs root"))
        return None, False
    if settings.mode == "tproxy":
        say(checks.tproxy_routing(_missing_routes(settings)))
    nft = _run(["nft", "list", "table", *NFT_TABLE.split()])
    nft_installed = nft is not None and nft.returncode == 0
    saved = {version: _run([f"{_tool(version)}-save"]) for version in (4, 6)}
    ours = {version: _iptables_ours(result.stdout if result else "") for version, result in saved.items()}
    backend = options["backend"] or ("nft" if nft_installed or not any(ours.values()) else "iptables")
    try:
        if backend == "nft":
            expected = _in_scratch_netns(f"nft -f - && nft list table {NFT_TABLE}", nft_script(settings))
            verdict = checks.rules("nft", COUNTERS.sub("", nft.stdout) if nft_installed else None, expected)
            say(verdict)
            ruleset = _run(["nft", "list", "ruleset"])
            hook_priority = checks.NFT_PRIORITIES["dstnat" if settings.mode == "redirect" else "mangle"]
            chains = checks.nft_base_chains(ruleset.stdout if ruleset else "")
            say(checks.nft_shadowing(chains, tuple(NFT_TABLE.split()), "prerouting", hook_priority))
            return verdict.level == checks.OK, nft_installed
        expected = "\n".join(
            f"{_tool(version)} {line}"
            for version in (4, 6)
            for line in _iptables_ours(
                _in_scratch_netns(
                    f"{_tool(version)}-restore -w 5 --noflush && {_tool(version)}-save",
                    iptables_restore(settings, version),
                )
            )
        )
    except RulesError as exc:
        say(checks.Verdict(checks.WARN, f"rules ({backend})", str(exc)))
        return None, False
    installed = "\n".join(f"{_tool(version)} {line}" for version in (4, 6) for line in ours[version])
    verdict = checks.rules("iptables", installed or None, expected)
    say(verdict)
    for version in (4, 6):
        _check_iptables_order(settings, version, saved[version].stdout if saved[version] else "", say)
    ipv6_intercepted = any(checks.jump_target(line.split()) == CHAIN for line in ours[6])  # IPv6 TCP jumps to us
    return verdict.level == checks.OK, ipv6_intercepted


def _missing_routes(settings: RuleSettings) -> list[str]:
    """The ``ip rule``/``ip route`` commands of TPROXY routing whose rule or route is not there."""
    missing = []
    for version in (4, 6) if settings.ipv6 else (4,):
        rule, route, route_query = route_parts(settings, version)
        for show, add in (
            (["rule", "show", *rule], ["rule", "add", *rule]),
            (["route", "show", *route_query], ["route", "add", *route]),
        ):
            result = _run(["ip", f"-{version}", *show])
            if result is None or not result.stdout.strip():
                missing.append(shlex.join(["ip", f"-{version}", *add]))
    return missing


def _tool(version: int) -> str:
    return "iptables" if version == 4 else "ip6tables"


def _iptables_ours(saved: str) -> list[str]:
    """From iptables-save: our chains' rules and the jumps to them, each as "TABLE RULE", in order."""
    lines, table = [], ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        words = line.split()
        if line.startswith("-A ") and (words[1] in OUR_CHAINS or set(words) & set(OUR_CHAINS)):
            lines.append(f"{table} {line}")
    return lines


def _check_iptables_order(settings: RuleSettings, version: int, saved: str, say) -> None:
    """Where the LAN's TCP jumps to us, is anything before the jump taking it?"""
    table = "nat" if settings.mode == "redirect" else "mangle"
    prerouting, current = [], ""
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith("-A PREROUTING "):
            prerouting.append(line)
    if any(f"-j {CHAIN}" in line for line in prerouting):
        say(checks.iptables_shadowing(_tool(version), table, prerouting, CHAIN, list(settings.lan_ifaces)))


def _lan_ipv6(lan_ifaces: list[str]) -> dict[str, list[str]]:
    """Global IPv6 addresses of the LAN interfaces (every one but lo if none is named)."""
    result = _run(["ip", "-j", "-6", "address", "show", "scope", "global"])
    try:
        interfaces = json.loads(result.stdout) if result and result.returncode == 0 else []
    except ValueError:
        interfaces = []
    found = {}
    for interface in interfaces:
        name = interface.get("ifname", "")
        if (name in lan_ifaces) if lan_ifaces else name != "lo":
            addresses = [info["local"] for info in interface.get("addr_info", []) if "local" in info]
            if addresses:
                found[name] = addresses
    return found


# -- through the network ---------------------------------------------------------


async def _network_checks(config: Config, target: tuple[str, int], udp_target: tuple[str, int], name: str, say) -> None:
    from relay.net.dial import Dialer, resolve
    from relay.net.tunnel import make_tunnels

    dialer = Dialer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.run)
        tunnels = make_tunnels(config, own_ports=True, lanes=1) if config.ssh else [None] * len(config.upstreams)
        for tunnel in filter(None, tunnels):
            tunnel.start_timeout = SSH_START_TIMEOUT
            started = trio.current_time()
            await nursery.start(tunnel.run)
            if tunnel.up and tunnel.session == "auto" and tunnel.with_session:
                # A refused session ends ssh just after its forward opened; the next ssh goes without one.
                if await tunnel.wait_down(SESSION_SETTLE):
                    await tunnel.wait_up(SSH_START_TIMEOUT)
            elif not tunnel.up and tunnel.doubting_session:  # the next ssh tries without a session: wait for it
                await tunnel.wait_up(SSH_START_TIMEOUT)
            up = trio.current_time() - started if tunnel.up else None
            say(checks.ssh_tunnel(tunnel.description, up, tunnel.last_failure, tunnel.session_given_up))
        target_text = f"{bracketed(target[0])}:{target[1]}"
        for upstream, tunnel in zip(config.upstreams, tunnels):
            if upstream.scheme == "direct":
                continue
            try:
                addresses = await resolve(*(tunnel.local_address if tunnel else (upstream.host, upstream.port)))
            except OSError as exc:
                say(checks.upstream(str(upstream), target_text, None, f"cannot resolve: {exc.strerror}", "proxy"))
                continue

            seconds, reason, fault = await _attempt(dialer, config, upstream, addresses, target)
            say(checks.upstream(str(upstream), target_text, seconds, reason, fault))
            if upstream.protocol == "http" and fault != "proxy":  # a proxy that is not there refuses nothing
                _, reason, _ = await _attempt(dialer, config, upstream, addresses, (target[0], NON_TLS_PORT))
                say(checks.non_tls_port(str(upstream), f"{bracketed(target[0])}:{NON_TLS_PORT}", reason))
        for upstream in config.udp_upstreams:
            say(await _ask_through_udp(dialer, config, upstream, udp_target, name))
        for host, port in config.dns:
            say(await trio.to_thread.run_sync(_ask_dns, host, port, name, config.dns_timeout + 1))
        nursery.cancel_scope.cancel()


async def _attempt(dialer, config: Config, upstream, addresses, destination) -> tuple:
    """A tunnel to ``destination`` through ``upstream``, closed at once: (seconds, None, None), or
    (None, reason, whose fault)."""
    from relay.net.faults import UpstreamError
    from relay.net.sockets import reset

    started = trio.current_time()
    try:
        sock, _ = await dialer.open_async(
            upstream,
            addresses,
            destination,
            mark=config.mark if os.geteuid() == 0 else None,  # SO_MARK needs CAP_NET_ADMIN
            connect_timeout=config.connect_timeout,
            handshake_timeout=config.handshake_timeout,
        )
    except UpstreamError as exc:
        return None, exc.reason, exc.fault.value
    reset(sock)
    return trio.current_time() - started, None, None


async def _ask_through_udp(dialer, config: Config, upstream, target: tuple[str, int], name: str) -> checks.Verdict:
    """A DNS query for ``name`` to ``target`` through ``upstream``'s UDP ASSOCIATE, as a UDP session of the
    relay would send it: whether the proxy associates, and whether an answer comes back through it."""
    from relay.net.dial import resolve
    from relay.net.faults import UpstreamError
    from relay.net.sockets import reset
    from relay.proto.errors import ProtocolError
    from relay.udp.service import relay_address_of

    target_text = f"{bracketed(target[0])}:{target[1]}"
    mark = config.mark if os.geteuid() == 0 else None  # SO_MARK needs CAP_NET_ADMIN
    control = None
    refused = False
    try:
        with trio.fail_after(config.connect_timeout + config.handshake_timeout):
            addresses = await resolve(upstream.host, upstream.port)
            control, bound = await dialer.associate_udp(
                upstream,
                addresses,
                mark=mark,
                connect_timeout=config.connect_timeout,
                handshake_timeout=config.handshake_timeout,
            )
        relay_address = relay_address_of(bound, control)
    except trio.TooSlowError:
        failure = "timed out"
    except UpstreamError as exc:
        failure, refused = exc.reason, exc.refused
    except (OSError, ProtocolError) as exc:
        failure = getattr(exc, "strerror", None) or str(exc)
    else:
        seconds, answer = await _query_relay_address(relay_address, target, name, mark)
        return checks.udp_upstream(str(upstream), target_text, relay_address, seconds, answer)
    finally:
        if control is not None:  # the association lives as long as its control connection
            reset(control)
    return checks.udp_upstream(str(upstream), target_text, None, None, failure, refused=refused)


async def _query_relay_address(
    relay_address: tuple[str, int], target: tuple[str, int], name: str, mark: int | None
) -> tuple[float | None, str | None]:
    """(seconds until the answer, its rcode), or (None, what came back instead of one, if anything)."""
    import dns.message
    import dns.rdatatype

    from relay.udp import datagram
    from relay.udp.service import association_socket

    query = dns.message.make_query(name, dns.rdatatype.A)
    request = datagram.encode(*target, query.to_wire())
    instead: deque[str] = deque(maxlen=1)  # the latest thing that came back and was not the answer
    started = trio.current_time()
    try:  # the socket a UDP session of the relay would use
        udp = trio.socket.from_stdlib_socket(association_socket(relay_address, mark))
    except OSError as exc:  # out of fds, no IPv6 here for an IPv6 relay address, no route to it
        return None, f"no socket to the relay address ({exc.strerror or exc})"
    with udp:
        with trio.move_on_after(UDP_CHECK_TIMEOUT):
            while True:
                with trio.move_on_after(UDP_CHECK_RESEND):
                    try:
                        await udp.send(request)
                        rcode = await _answer(udp, query, target, instead)
                        return trio.current_time() - started, rcode
                    except OSError as exc:  # refused: an ICMP port unreachable, the proxy closed its relay port
                        refused = isinstance(exc, ConnectionRefusedError)
                        instead.append("a port unreachable from the relay address" if refused else exc.strerror)
                        await trio.sleep_forever()  # until the next time the query goes
    return None, instead[-1] if instead else None


async def _answer(udp, query, target: tuple[str, int], instead: deque[str]) -> str:
    """The rcode of the first datagram from ``target`` that answers ``query``; what else comes goes into
    ``instead``."""
    import dns.exception
    import dns.message
    import dns.rcode

    from relay.udp import datagram

    asked = (ipaddress.ip_address(target[0]), target[1])
    while True:
        try:
            host, port, payload = datagram.decode(await udp.recv(MAX_DATAGRAM))
            response = dns.message.from_wire(bytes(payload))
        except datagram.BadDatagram as exc:
            instead.append(f"a datagram that is not a SOCKS5 UDP reply ({exc})")
        except dns.exception.DNSException as exc:
            instead.append(f"a datagram that is not a DNS answer ({exc})")
        else:
            if (ipaddress.ip_address(host), port) != asked:
                instead.append(f"a datagram from {bracketed(host)}:{port}, not from the server asked")
            elif not query.is_response(response):  # the query itself echoed, say
                instead.append("a DNS message that does not answer the query")
            else:
                return dns.rcode.to_text(response.rcode())


def _ask_dns(host: str, port: int, name: str, timeout: float) -> checks.Verdict:
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        host = "127.0.0.1" if address.version == 4 else "::1"
    where = f"{bracketed(host)}:{port}"
    started = time.monotonic()
    try:
        response = dns.query.udp(dns.message.make_query(name, dns.rdatatype.A), host, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return checks.dns(where, name, None, None, [])
    answers = [rdata.to_text() for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rdata in rrset]
    return checks.dns(where, name, time.monotonic() - started, dns.rcode.to_text(response.rcode()), answers)
