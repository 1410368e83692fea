"""Command line: ``relay [OPTIONS]`` runs the relay, ``relay rules`` prints or installs the
firewall rules, ``relay check`` checks the router for them, ``relay demo`` runs the namespace demo.

Every option is also a key of the TOML config file (``--config FILE``); options
given on the command line override the file.
"""

import sys

from relay.config import ConfigError
from relay.options import build_parser, load_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from relay.lab.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["check"]:
        from relay.check_command import main as check_main

        return check_main(argv[1:])
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
