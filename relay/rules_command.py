"""``relay rules``: print, apply or remove the firewall rules for a relay configuration."""

import argparse
import socket
import sys

from relay.config import DEFAULT_PORT, Config, ConfigError
from relay.options import build_parser, load_config
from relay.rules import RulesError, RuleSettings, apply, describe, remove


def build_rules_parser() -> argparse.ArgumentParser:
    parser = build_parser("relay rules")
    parser.description = (
        "Print the iptables or nftables rules (and, for TPROXY, the ip rule/route lines) that send LAN TCP "
        "to a relay with these options, and with --dns the LAN's UDP and TCP port 53 to its DNS service; "
        "--apply installs them in their own chains/table, --remove takes them out."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--apply", action="store_true", help="install the rules (atomically; applying twice changes nothing)"
    )
    action.add_argument("--remove", action="store_true", help="remove exactly what --apply installed")
    add_rule_options(parser, "default: nft")
    return parser


RULE_OPTIONS = ("backend", "redirect_output", "keep_private")


def add_rule_options(parser: argparse.ArgumentParser, backend_help: str) -> None:
    """The options that choose the rules besides the relay's own settings (``relay rules``, ``relay check``)."""
    parser.add_argument("--backend", choices=("iptables", "nft"), help=backend_help)
    parser.add_argument("--redirect-output", action="store_true", help="also intercept the router's own outgoing TCP")
    parser.add_argument(
        "--keep-private", action="store_true", help="intercept private and reserved destinations too (normally exempt)"
    )


def _addresses(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc.strerror}") from None


def settings_for(config: Config, redirect_output: bool = False, keep_private: bool = False) -> RuleSettings:
    """The rules a relay with ``config`` needs: its port, LAN interfaces, mark and DNS service, every
    address its own traffic goes to (proxies, the SSH server, bypassed networks) exempt, and in fake-ip
    mode its fake ranges."""
    if config.mark is None:
        raise ConfigError("relay rules needs --mark: the rules exempt the relay's own (marked) traffic")
    ports = {port for _, port in config.listen} or {DEFAULT_PORT}
    if len(ports) > 1:
        raise ConfigError("relay rules: the listen addresses use several ports; use one")
    exempt = [str(network) for network in config.bypass]
    if config.ssh:
        from relay.net.tunnel import parse_ssh_target

        exempt += _addresses(parse_ssh_target(config.ssh).host)
    else:
        for upstream in config.upstreams:
            if upstream.scheme != "direct":
                exempt += _addresses(upstream.host)
    return RuleSettings(
        mode=config.mode,
        port=ports.pop(),
        lan_ifaces=tuple(config.lan_iface),
        mark=config.mark,
        exempt=tuple(dict.fromkeys(exempt)),
        redirect_output=redirect_output,
        exempt_private=not keep_private,
        dns=tuple(config.dns),
        fake_ip_ranges=tuple(map(str, config.fake_ip_range)) if config.dns_mode == "fake-ip" else (),
        # UDP relayed is TPROXYed before it could be forwarded: nothing left to reject.
        udp_reject="off" if config.udp_upstreams else config.udp_reject,
        udp=bool(config.udp_upstreams),
    )


def main(argv: list[str]) -> int:
    args = build_rules_parser().parse_args(argv)
    rule_options = {key: vars(args).pop(key, None) for key in ("apply", "remove", *RULE_OPTIONS)}
    try:
        settings = settings_for(
            load_config(args), bool(rule_options["redirect_output"]), bool(rule_options["keep_private"])
        )
        backend = rule_options["backend"] or "nft"
        if rule_options["apply"]:
            apply(settings, backend)
        elif rule_options["remove"]:
            remove(settings, backend)
        else:
            print(describe(settings, backend))
    except (ConfigError, RulesError) as exc:
        print(f"relay rules: error: {exc}", file=sys.stderr)
        return 2
    return 0
