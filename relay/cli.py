"""Command line: ``relay [OPTIONS]`` runs the relay, ``relay demo`` runs the namespace demo."""

import argparse
import sys

import trio

from relay import __version__, fastpath, logs
from relay.config import Config, ConfigError, parse_host_port, parse_upstream


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _mark(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal or 0x hex)") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 1 and 0xffffffff")
    return value


def _size(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes")
    return int(text)


def _wrap(parse, what):
    """Turn a ConfigError from ``parse`` into an argparse error naming the option."""

    def convert(text):
        try:
            return parse(text) if what is None else parse(text, what)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relay",
        description="Transparent TCP relay: sends REDIRECTed or TPROXYed connections through an upstream proxy.",
        epilog="Run 'relay demo' for a self-contained demonstration in network namespaces (root).",
    )
    parser.add_argument(
        "--version", action="version", version=f"relay {__version__} (fast path: {fastpath.WHY})"
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        type=_wrap(parse_upstream, None),
        help="HOST:PORT or http://[user:pass@]HOST:PORT (HTTP CONNECT), socks5://[user:pass@]HOST:PORT, "
        "socks4://HOST:PORT, socks4a://HOST:PORT, or 'direct'",
    )
    parser.add_argument("--mode", choices=("redirect", "tproxy"), default="redirect", help="how connections are intercepted (default: redirect)")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        type=_wrap(parse_host_port, "listen address"),
        default=[],
        help="address to listen on, repeatable (default: 0.0.0.0:12345 and [::]:12345)",
    )
    parser.add_argument("--mark", type=_mark, help="SO_MARK for upstream sockets, so firewall rules can exempt them")
    parser.add_argument("--connect-timeout", type=_positive_float, default=5.0, metavar="S", help="upstream TCP connect (default: 5)")
    parser.add_argument("--handshake-timeout", type=_positive_float, default=10.0, metavar="S", help="proxy handshake (default: 10)")
    parser.add_argument("--idle-timeout", type=_positive_float, default=600.0, metavar="S", help="close connections idle this long (default: 600)")
    parser.add_argument(
        "--sniff",
        choices=("on", "off"),
        default="on",
        help="ask the proxy for the hostname from TLS SNI or the HTTP Host header, so the far side resolves it (default: on)",
    )
    parser.add_argument("--sniff-timeout", type=_positive_float, default=0.3, metavar="S", help="wait this long for the client's first bytes before connecting by IP (default: 0.3)")
    parser.add_argument(
        "--http-mode",
        choices=("forward", "connect"),
        default="forward",
        help="plain HTTP through an HTTP proxy: 'forward' sends requests in absolute form, 'connect' tunnels them (default: forward)",
    )
    parser.add_argument("--pipe-size", type=_size, default=0, metavar="BYTES", help="splice pipe size (default: the kernel's)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: one line per connection; -vv: debug")
    return parser


def config_from_args(args) -> Config:
    return Config(
        upstream=args.upstream,
        mode=args.mode,
        listen=args.listen,
        mark=args.mark,
        connect_timeout=args.connect_timeout,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        pipe_size=args.pipe_size,
        sniff=args.sniff == "on",
        sniff_timeout=args.sniff_timeout,
        http_mode=args.http_mode,
        verbose=args.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from relay.lab.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.upstream is None:
        parser.error("--upstream is required (for example: --upstream 127.0.0.1:3128)")
    logs.setup(args.verbose)
    from relay.net.server import run

    try:
        trio.run(run, config_from_args(args))
    except ConfigError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return 2
    return 0
