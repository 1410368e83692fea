"""Command line: ``relay [OPTIONS]`` runs the relay, ``relay rules`` prints or installs the
firewall rules, ``relay demo`` runs the namespace demo.

Every option is also a key of the TOML config file (``--config FILE``); options
given on the command line override the file.
"""

import argparse
import sys

from relay import __version__, fastpath
from relay.config import SETTINGS, Config, ConfigError, load_file


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "relay") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Transparent TCP relay: sends REDIRECTed or TPROXYed connections through an upstream proxy.",
        epilog="'relay rules --help': the firewall rules for this configuration. "
        "'relay demo': a self-contained demonstration in network namespaces (root).",
        argument_default=argparse.SUPPRESS,  # only what was given, so the config file can fill the rest
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__} (fast path: {fastpath.WHY})")
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of these options as keys (e.g. connect-timeout = 5)")
    for setting in SETTINGS:
        if setting.key == "verbose":
            continue
        parser.add_argument(f"--{setting.key}", metavar=setting.metavar, help=setting.help,
                            action="append" if setting.repeatable else "store")
    parser.add_argument("-v", "--verbose", action="count", help="-v: one line per connection; -vv: debug")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The file's settings (if --config), overridden by the command line's."""
    values = load_file(args.config) if "config" in args else {}
    source = f"{args.config}: " if "config" in args else ""
    Config.from_values(values, source, complete=False)  # so that errors in the file name the file
    given = {key.replace("_", "-"): value for key, value in vars(args).items() if key != "config"}
    return Config.from_values({**values, **given}, key_prefix="--")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from relay.lab.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["rules"]:
        from relay.rules_command import main as rules_main

        return rules_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return 2
    from relay.process import run

    return run(config, lambda: load_config(args))
