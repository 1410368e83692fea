"""The relay process: logging, worker processes, privileges, metrics, and the Trio run."""

import os
import resource
import signal
import sys

import trio

from relay import __version__, fastpath, logs
from relay.config import Config, ConfigError
from relay.metrics import Metrics, serve_metrics
from relay.net.server import Server
from relay.status import Status

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(config: Config, reload) -> int:
    """Run until stopped; returns the exit status. ``reload()`` gives the configuration anew on SIGHUP."""
    logs.setup(config.verbose, config.log_format)
    if config.workers > 1:
        return _run_workers(config, reload)
    return _run_one(config, reload, worker=0)


def _run_one(config: Config, reload, worker: int) -> int:
    # Trio's receiver (opened first thing in _serve) saves and later restores these, and hands
    # signals still pending at exit to them: a second SIGTERM while exiting must not kill us.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    try:
        trio.run(_serve, config, reload, worker, strict_exception_groups=True)  # bookworm's Trio 0.22: not the default
    except ConfigError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(config: Config, reload, worker: int) -> None:
    # The receiver is opened first, so a stop signal is never lost nor fatal during start-up.
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        raise_fd_limit()
        metrics = Metrics(version=__version__, fast_path=fastpath.NAME)
        server = Server(config, metrics, reload)
        await server.open()
        if config.user:
            from relay.privileges import drop_to

            drop_to(config.user)
        async with trio.open_nursery() as nursery:
            if config.metrics:
                host, port = config.metrics
                status = Status(metrics, server.connections, server.dns, udp=server.udp is not None)
                await nursery.start(serve_metrics, metrics, host, port + worker, status)
            await server.serve(signals)
            nursery.cancel_scope.cancel()


def raise_fd_limit() -> None:
    """Use all the fds we may: the soft limit (often 1024) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; the connection budget follows whatever it is


def _run_workers(config: Config, reload) -> int:
    """Fork one process per worker, each with its own SO_REUSEPORT listeners; pass signals on."""
    children = []
    for worker in range(config.workers):
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # signals reach workers from us only, once each
            os._exit(_run_one(config, reload, worker))
        children.append(pid)

    def pass_on(signum, _frame):
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for signum in STOP_SIGNALS:
        signal.signal(signum, pass_on)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
