"""The options of ``relay`` and ``relay rules``: one argparse parser built from the settings, and
the Config it gives (the config file's values, overridden by the command line's)."""

import argparse
import sys

from relay import __version__, fastpath
from relay.config import SETTINGS, Config, load_file


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr and exit status 2, without the
    userinfo of any URL it quotes (a mistyped option name is quoted with its value)."""

    arguments: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self.arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        for argument in self.arguments:
            message = message.replace(argument, _hide_userinfo(argument))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _hide_userinfo(argument: str) -> str:
    """``argument`` with what lies between its first ``://`` (or ``=``, or its start) and its last ``@`` as ***."""
    head, at, host_part = argument.rpartition("@")
    if not at:
        return argument
    for mark in ("://", "="):
        if mark in head:
            return f"{head[: head.index(mark) + len(mark)]}***@{host_part}"
    return f"***@{host_part}"


def build_parser(prog: str = "relay") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Transparent TCP relay: sends REDIRECTed or TPROXYed connections through an upstream proxy.",
        epilog="'relay rules --help': the firewall rules for this configuration. "
        "'relay demo': a self-contained demonstration in network namespaces (root).",
        argument_default=argparse.SUPPRESS,  # only what was given, so the config file can fill the rest
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__} (fast path: {fastpath.WHY})")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with any of these options as keys (e.g. connect-timeout = 5)"
    )
    for setting in SETTINGS:
        if setting.key == "verbose":
            continue
        parser.add_argument(
            f"--{setting.key}",
            metavar=setting.metavar,
            help=setting.help,
            action="append" if setting.repeatable else "store",
        )
    parser.add_argument("-v", "--verbose", action="count", help="-v: one line per connection; -vv: debug")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The file's settings (if --config), overridden by the command line's."""
    values = load_file(args.config) if "config" in args else {}
    source = f"{args.config}: " if "config" in args else ""
    Config.from_values(values, source, complete=False)  # so that errors in the file name the file
    given = {key.replace("_", "-"): value for key, value in vars(args).items() if key != "config"}
    return Config.from_values({**values, **given}, key_prefix="--")
