"""An OpenSSH tunnel the relay starts and supervises itself: ``ssh -N -L`` to a
proxy on the far host, or ``ssh -N -D`` (ssh itself as the SOCKS5 proxy).

What notices that the tunnel broke, and how fast:

- **ssh exits**, for whatever reason: seen at once, the supervisor waits on the
  process. The tunnel is marked down before anything else happens.
- **The link dies silently** (far host gone, packets dropped, no FIN): ssh's own
  keepalives (``ServerAliveInterval`` x ``ServerAliveCountMax``) make it exit
  with status 255. Nothing on this machine can tell sooner: ssh accepts
  connections on its local port whether or not the far side still answers.
- **The probe**, every ``probe_interval`` while ssh runs: a TCP connect to the
  local port (ssh still listens), then

  - ``-D``: a SOCKS5 greeting (``05 01 00``) that ssh answers itself with
    ``05 00``, so its event loop is alive;
  - ``-L``: ssh opens a channel to the far host for every connection it
    accepts, and closes ours at once if the far host refuses (its proxy is
    down, forwarding is forbidden). A connection still open after
    ``CHANNEL_REFUSAL_WINDOW`` passes: an opened channel and one stuck on a
    dead link look the same from here, and the dead link is the keepalives'
    job. Each probe is therefore one empty connection to the far proxy (squid
    logs it as ``error:transaction-end-before-headers``).

  A failed probe marks the tunnel down and restarts ssh. A restart does not
  bring a stopped far proxy back, but the capped backoff limits that to one
  attempt per ``backoff_max`` seconds, and the tunnel is up again as soon as
  the proxy is.

Restarts wait ``backoff_start``, doubling up to ``backoff_max``; an ssh that
stayed up for ``backoff_max`` seconds resets the sequence. While ``up`` is
False the relay resets new connections itself; while ssh is not running
nothing listens on the local port, so connecting is refused at once anyway.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import trio

from relay.addresses import bracketed, format_address
from relay.config import Config, ConfigError
from relay.logs import log
from relay.net.sockets import family_of

# Connections ssh closes within this long after accepting them were refused by the far host.
CHANNEL_REFUSAL_WINDOW = 1.0
READY_POLL_SECONDS = 0.1  # how often to try the local port while ssh logs in
STOP_GRACE_SECONDS = 2.0  # SIGTERM, then SIGKILL
STDERR_DRAIN_SECONDS = 1.0  # ssh's last words may still be in the pipe when it exits
EXIT_AFTER_PROBE_SECONDS = 0.2  # after a failed probe, how long an exiting ssh gets to be seen exiting
STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 3  # of those, what goes into a log line
# What StrictHostKeyChecking=accept-new prints on a first connection: news, not a reason ssh failed.
KNOWN_HOSTS_NOTICE = re.compile(r"^Warning: Permanently added .* to the list of known hosts\.$")

SOCKS5_NO_AUTH_GREETING = b"\x05\x01\x00"
SOCKS5_NO_AUTH_ACCEPTED = b"\x05\x00"

# Placed before the user's options: ssh keeps the first value it sees for each key.
REQUIRED_OPTIONS = (
    ("BatchMode", "yes"),  # there is no one to type a password or confirm a host key
    ("ExitOnForwardFailure", "yes"),  # a tunnel without its forward must exit, so it is restarted
    # A shared master connection would carry our forward and hide the state of the link.
    ("ControlMaster", "no"),
    ("ControlPath", "none"),
)

# What the session runs (--ssh-session): nothing but waiting, as long as ssh is up.
SESSION_COMMAND = "exec sleep 2147483647"
# ssh's own failures exit 255 (as does a command killed by a signal); any other status is the session's command's.
SESSION_ENDED = frozenset(f"exit-{status}" for status in range(255))
# auto: an ssh with a session that ends sooner than this after its start is doubted (MaxSessions 0 refuses the
# session just after ssh opened its forward, so even "came up" does not tell).
SESSION_TRIAL_SECONDS = 10.0

# Host names, ssh_config aliases and IPv4 addresses; never something ssh would take for an option.
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class SshTarget:
    """Where ssh logs in: ``[user@]host[:port]``. No user or port: ssh's own choice (ssh_config, or 22)."""

    host: str
    port: int | None = None
    user: str | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = bracketed(self.host)
        return f"{user}{host}" + (f":{self.port}" if self.port is not None else "")


def parse_ssh_target(text: str) -> SshTarget:
    """Parse ``[user@]host[:port]``, IPv6 as ``[addr]`` or ``[addr]:port``; raises ConfigError."""

    def invalid(why: str) -> ConfigError:
        return ConfigError(f"invalid ssh target {text!r}: {why}")

    user, at, rest = text.rpartition("@")
    if at and not _USER_NAME.fullmatch(user):
        raise invalid("bad user name")
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise invalid("expected [IPV6] or [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise invalid(f"{host!r} is not an IPv6 address") from None
        port_text = after[1:] if after else None
    else:
        if rest.count(":") > 1:
            raise invalid("write IPv6 addresses as [ADDR] or [ADDR]:PORT")
        host, colon, port_text = rest.partition(":")
        if not _HOST_NAME.fullmatch(host):
            raise invalid("bad host name")
        port_text = port_text if colon else None
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise invalid("port must be 1-65535")
        port = int(port_text)
    return SshTarget(host, port, user or None)


def backoff_delays(start: float, cap: float) -> Iterator[float]:
    """start, 2*start, 4*start, ... never more than cap."""
    delay = start
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


class ProbeFailed(Exception):
    """The forward did not answer a probe; the message says how."""


class NotListening(ProbeFailed):
    """Nothing accepts on the local port: ssh is still logging in, or lost its forward."""


class _Tail:
    """The last bytes a process wrote: enough to say why it exited, bounded however much it writes."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.finished = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while data := await stream.receive_some(STDERR_TAIL_BYTES):
                self._data += data
                del self._data[:-STDERR_TAIL_BYTES]
        finally:
            self.finished.set()

    def last_lines(self) -> str:
        lines = [line.strip() for line in self._data.decode(errors="replace").splitlines()]
        said = [line for line in lines if line and not KNOWN_HOSTS_NOTICE.match(line)]
        return " | ".join(said[-STDERR_TAIL_LINES:])


def _describe_exit(returncode: int) -> tuple[str, str]:
    """(short word for metrics, phrase for the log) for ssh's exit status."""
    if returncode >= 0:
        return f"exit-{returncode}", f"ssh exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed-{name}", f"ssh was killed by {name}"


def _free_port(host: str) -> int:
    """A port nothing uses right now. ssh binds with SO_REUSEADDR, so our closed socket is no obstacle;
    another program could take the port in between, and ssh then exits and is restarted on it."""
    with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise ConfigError(f"the ssh tunnel cannot listen on {host}: {exc.strerror}") from None
        return sock.getsockname()[1]


async def _first_of(*functions: Callable[[], Awaitable[tuple[str, str]]]) -> tuple[str, str]:
    """Run ``functions`` concurrently; the first to return wins and the others are cancelled."""
    results = []
    async with trio.open_nursery() as nursery:

        async def run(function):
            results.append(await function())
            nursery.cancel_scope.cancel()

        for function in functions:
            nursery.start_soon(run, function)
    return results[0]


async def _until_exit(process: trio.Process) -> tuple[str, str]:
    await process.wait()
    return _describe_exit(process.returncode)


async def _terminate(process: trio.Process) -> None:
    """SIGTERM ssh's process group (ssh and any ProxyCommand), SIGKILL after a grace period;
    reap it and close its stderr pipe."""
    with trio.CancelScope(shield=True):
        for signum in (signal.SIGTERM, signal.SIGKILL):
            # Only while unreaped: after that the group id may belong to someone else.
            if process.returncode is not None:
                break
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass
            with trio.move_on_after(STOP_GRACE_SECONDS):
                await process.wait()
        await process.stderr.aclose()


class SshTunnel:
    """``ssh -N -L local:remote`` (``forward="local"``) or ``ssh -N -D local`` (``forward="socks"``) to
    ``target``, restarted whenever it exits or stops answering; see the module docstring.

    ``remote`` is where the far host connects for -L (the upstream proxy as the far host sees it);
    ``local`` is where ssh listens here, port 0 meaning a free port chosen now: ``local_address``
    is fixed for the tunnel's life, so the relay can connect there at any time.
    ``on_restart(reason)`` is called with a short word (``exit-255``, ``killed-SIGKILL``,
    ``probe-failed``, ``start-timeout``, ``spawn-failed``) for each restart, e.g. for metrics.
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        forward: Literal["local", "socks"],
        remote: tuple[str, int] | None,
        local: tuple[str, int],
        identity: str | None = None,
        options: tuple[tuple[str, str], ...] = (),
        session: Literal["auto", "on", "off"] = "off",
        ssh_binary: str = "ssh",
        alive_interval: int = 5,
        alive_count: int = 3,
        connect_timeout: int = 10,
        probe_interval: float = 5.0,
        probe_timeout: float = 5.0,
        start_timeout: float = 30.0,
        backoff_start: float = 0.5,
        backoff_max: float = 30.0,
        on_restart: Callable[[str], None] | None = None,
    ):
        if forward not in ("local", "socks"):
            raise ValueError(f"forward must be 'local' or 'socks', not {forward!r}")
        if (forward == "local") != (remote is not None):
            raise ValueError("remote is required with forward='local' and meaningless with 'socks'")
        self.target = target
        self.forward = forward
        self.remote = remote
        self.local_address = (local[0], local[1] or _free_port(local[0]))
        self.identity = identity
        self.options = tuple(options)
        self.session = session
        # auto: why the session may be what failed, while the next ssh tries without (-N); and whether the session
        # stood in the way, so that ssh runs without one from now on.
        self._session_doubted: str | None = None
        self._session_given_up = False
        self.ssh_binary = ssh_binary
        self.alive_interval = alive_interval
        self.alive_count = alive_count
        self.connect_timeout = connect_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.start_timeout = start_timeout
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.on_restart = on_restart
        self.upstream = None  # the Upstream it carries (make_tunnels)
        self.label = ""  # how logs and metrics name it: the upstream, with its lane when there are several
        self.restarts = 0
        self.last_failure: str | None = None  # why the latest ssh went down, as logged
        self._up = False
        self._up_since = 0.0
        self._last_uptime = 0.0  # how long the latest ssh stayed up
        self._changed = trio.Event()  # set and replaced whenever ``up`` changes

    @property
    def up(self) -> bool:
        """True while ssh runs and its forward answered the latest probe."""
        return self._up

    @property
    def description(self) -> str:
        where = format_address(self.local_address)
        if self.forward == "socks":
            return f"-D {where} via {self.target}"
        return f"-L {where} via {self.target} to {format_address(self.remote)}"

    @property
    def argv(self) -> list[str]:
        """The ssh command line: required options, then the user's, then defaults they may override."""
        defaults = (
            ("ServerAliveInterval", str(int(self.alive_interval))),
            ("ServerAliveCountMax", str(int(self.alive_count))),
            ("ConnectTimeout", str(int(self.connect_timeout))),
            ("StrictHostKeyChecking", "accept-new"),  # no one can confirm a first key; a changed one is refused
        )
        # sshd sets TCP_NODELAY when a session opens (OpenSSH's ssh_packet_set_interactive); -N opens none.
        argv = [self.ssh_binary, "-n", "-T"] if self.with_session else [self.ssh_binary, "-N"]
        for key, value in (*REQUIRED_OPTIONS, *self.options, *defaults):
            argv += ["-o", f"{key}={value}"]
        if self.identity is not None:
            argv += ["-i", self.identity]
        if self.target.port is not None:
            argv += ["-p", str(self.target.port)]
        if self.target.user is not None:
            argv += ["-l", self.target.user]
        if self.forward == "socks":
            argv += ["-D", format_address(self.local_address)]
        else:
            argv += ["-L", f"{format_address(self.local_address)}:{format_address(self.remote)}"]
        argv += ["--", self.target.host]  # "--": the host can never be read as an option
        return [*argv, SESSION_COMMAND] if self.with_session else argv

    async def wait_up(self, timeout: float) -> bool:
        """Whether the tunnel is up, waiting at most ``timeout`` seconds for it."""
        return await self._wait_for(True, timeout)

    async def wait_down(self, timeout: float) -> bool:
        """Whether the tunnel is down, waiting at most ``timeout`` seconds for it."""
        return await self._wait_for(False, timeout)

    async def _wait_for(self, up: bool, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self._up != up:
                await self._changed.wait()
        return self._up == up

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            self._up_since = trio.current_time()
        else:
            self._last_uptime = trio.current_time() - self._up_since
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Supervise ssh until cancelled; ssh is stopped and reaped on the way out.

        Reports started once the forward first answers, or once the first ssh
        failed: either way start-up is bounded (by ``start_timeout``), and the
        relay listens meanwhile, resetting connections until the tunnel is up.
        """
        delays = backoff_delays(self.backoff_start, self.backoff_max)
        started = False

        def announce_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            self._last_uptime = 0.0
            started_at = trio.current_time()
            kind, reason = await self._run_ssh_once(announce_started)
            announce_started()
            if self.session == "auto":
                self._judge_session(kind, reason, lived=trio.current_time() - started_at)
            if self._last_uptime >= self.backoff_max:
                delays = backoff_delays(self.backoff_start, self.backoff_max)
            delay = next(delays)
            self.restarts += 1
            self.last_failure = reason
            log.warning("ssh tunnel %s is down: %s; restarting in %g s", self.description, reason, delay)
            if self.on_restart is not None:
                self.on_restart(kind)
            await trio.sleep(delay)

    @property
    def with_session(self) -> bool:
        """Whether the next ssh holds a session (-n -T and a command) rather than none (-N)."""
        if self.session == "auto":
            return not self._session_given_up and self._session_doubted is None
        return self.session == "on"

    @property
    def doubting_session(self) -> bool:
        """auto: an ssh with a session never came up; the next one tries without."""
        return self._session_doubted is not None

    @property
    def session_given_up(self) -> bool:
        """auto: ssh runs without a session from now on, as the session stood in the way."""
        return self._session_given_up

    def _judge_session(self, kind: str, reason: str, lived: float) -> None:
        """--ssh-session auto, after each ssh: a session whose command ended (no shell, a forced command) is given
        up; an ssh with a session that ended within SESSION_TRIAL_SECONDS (sshd's MaxSessions 0 refuses the
        session, and ssh exits 255 as for any failure) is doubted: the next ssh runs without, and if that one
        comes up, the session is given up, else the next tries it again."""
        if self._session_doubted is not None:  # without a session, ssh failed too: the session was not it
            self._session_doubted = None
        elif self.with_session and kind in SESSION_ENDED:
            self._give_up_session(f"the session's command ended ({reason})")
        elif self.with_session and lived < SESSION_TRIAL_SECONDS:
            self._session_doubted = reason

    def _came_up(self) -> None:
        if self._session_doubted is not None:  # without the session it works
            self._give_up_session(f"with a session, ssh ended at once ({self._session_doubted})")
            self._session_doubted = None

    def _give_up_session(self, why: str) -> None:
        self._session_given_up = True
        log.warning(
            "ssh tunnel %s: %s: the account may have no shell, a forced command or no sessions allowed; going on "
            "without a session, so sshd may hold the far side's small writes for a round trip (--ssh-session off "
            "says so, on insists)",
            self.description,
            why,
        )

    async def _run_ssh_once(self, announce_started: Callable[[], None]) -> tuple[str, str]:
        """Start ssh and watch it until it exits or stops answering: (short word, log phrase) saying why."""
        try:
            process = await trio.lowlevel.open_process(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed whole
            )
        except OSError as exc:
            return "spawn-failed", f"cannot run {self.ssh_binary}: {exc.strerror}"
        stderr = _Tail()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stderr.collect, process.stderr)
                kind, reason = await _first_of(
                    partial(_until_exit, process),
                    partial(self._until_unhealthy, announce_started),
                )
                self._set_up(False)  # at once, not after the waits below
                if kind == "probe-failed":
                    # ssh closes its connections as it exits: a probe may see that before the exit.
                    with trio.move_on_after(EXIT_AFTER_PROBE_SECONDS):
                        await process.wait()
                if process.returncode is not None:
                    kind, reason = _describe_exit(process.returncode)
                    with trio.move_on_after(STDERR_DRAIN_SECONDS):
                        await stderr.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._set_up(False)
            await _terminate(process)
        said = stderr.last_lines()
        return kind, reason + (f" (ssh said: {said})" if said else "")

    async def _until_unhealthy(self, announce_started: Callable[[], None]) -> tuple[str, str]:
        """Wait for the forward to answer, mark the tunnel up, then probe until a probe fails."""
        try:
            with trio.fail_after(self.start_timeout):
                while True:
                    try:
                        await self._probe()
                        break
                    except NotListening:
                        await trio.sleep(READY_POLL_SECONDS)
        except trio.TooSlowError:
            return "start-timeout", f"ssh did not open its forward within {self.start_timeout:g} s"
        except ProbeFailed as exc:
            return "probe-failed", f"the new forward does not answer: {exc}"
        self._set_up(True)
        self._came_up()
        log.info("ssh tunnel %s is up", self.description)
        announce_started()
        while True:
            await trio.sleep(self.probe_interval)
            try:
                await self._probe()
            except ProbeFailed as exc:
                return "probe-failed", f"probe failed: {exc}"

    async def _probe(self) -> None:
        """Return if the forward answers, else raise ProbeFailed saying how it did not."""
        where = format_address(self.local_address)
        sock = trio.socket.socket(family_of(self.local_address[0]))
        try:
            with trio.fail_after(self.probe_timeout):
                await sock.connect(self.local_address)
        except trio.TooSlowError:
            sock.close()
            raise ProbeFailed(f"connecting to {where} timed out after {self.probe_timeout:g} s") from None
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # trio's strerror repeats the address
            raise NotListening(f"connecting to {where} failed: {why}") from None
        async with trio.SocketStream(sock) as stream:
            try:
                if self.forward == "socks":
                    await self._expect_socks_answer(stream)
                else:
                    await self._expect_channel_kept(stream)
            except trio.BrokenResourceError:
                raise ProbeFailed(f"ssh reset the connection to {where}") from None

    async def _expect_socks_answer(self, stream: trio.SocketStream) -> None:
        reply = b""
        try:
            with trio.fail_after(self.probe_timeout):
                await stream.send_all(SOCKS5_NO_AUTH_GREETING)
                while len(reply) < len(SOCKS5_NO_AUTH_ACCEPTED):
                    data = await stream.receive_some(len(SOCKS5_NO_AUTH_ACCEPTED) - len(reply))
                    if not data:
                        break
                    reply += data
        except trio.TooSlowError:
            raise ProbeFailed(f"no answer to a SOCKS5 greeting within {self.probe_timeout:g} s") from None
        if reply != SOCKS5_NO_AUTH_ACCEPTED:
            raise ProbeFailed(f"SOCKS5 greeting answered with {reply.hex() or 'a close'}")

    async def _expect_channel_kept(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(CHANNEL_REFUSAL_WINDOW):
            if not await stream.receive_some(1):
                raise ProbeFailed(f"the far host refused to connect to {format_address(self.remote)}")


def make_tunnels(config: Config, metrics=None, *, own_ports: bool = False, lanes: int | None = None) -> list[SshTunnel]:
    """Supervised ssh per upstream, ``lanes`` of them (default --ssh-connections), in the upstreams' order:
    -L to an HTTP/SOCKS4 proxy as the far host sees it, -D for SOCKS5. Each is its own TCP connection
    across the link, so one bulk download does not hold up another lane's new connections, and its own
    process, so their encryption runs on several cores. ``tunnel.upstream`` says whose it is.

    ``own_ports``: every forward on a free loopback port, so that ``relay check`` can run its own beside
    a running relay's (which holds the SOCKS5 upstreams' addresses)."""
    target = parse_ssh_target(config.ssh)
    lanes = config.ssh_connections if lanes is None else lanes
    tunnels = []
    for upstream in config.upstreams:
        for lane in range(lanes):
            if upstream.scheme == "socks5":
                # The first lane listens where the configuration says the SOCKS5 proxy is; the others beside it.
                given = (upstream.host, upstream.port) if lane == 0 and not own_ports else ("127.0.0.1", 0)
                forward, remote, local = "socks", None, given
            else:
                forward, remote, local = "local", (upstream.host, upstream.port), ("127.0.0.1", 0)
            tunnel = SshTunnel(
                target,
                forward=forward,
                remote=remote,
                local=local,
                identity=config.ssh_identity,
                options=tuple(config.ssh_option),
                session=config.ssh_session,
            )
            tunnel.upstream = upstream
            tunnel.label = str(upstream) if lanes == 1 else f"{upstream}#{lane + 1}"
            if metrics is not None:
                tunnel.on_restart = lambda reason, name=tunnel.label: metrics.tunnel_restarted(name, reason)
            tunnels.append(tunnel)
    return tunnels
