"""Several upstreams: which one a new connection uses, and whether each is healthy.

Health is passive (N proxy failures in a row make an upstream unhealthy, a
success makes it healthy again) and active (every --health-interval a real
connection and a question the proxy answers itself, or a full handshake when
--health-target is set; a lone upstream only while it is marked down). Connections
go to healthy upstreams only, in order (failover) or in turn (round-robin);
when none is healthy they are reset at once rather than left to time out.
"""

import itertools

import trio

from relay import ends
from relay.config import Config, ConfigError, Upstream
from relay.logs import log
from relay.net import early_data
from relay.net.dial import connect, resolve
from relay.net.faults import Fault, UpstreamError, handshake_failure, handshake_timed_out
from relay.net.sockets import receive_some, reset, write_all
from relay.net.tls import check_contexts, stream_failure, tls_stream
from relay.proto.liveness import HEALTH_QUESTIONS, LIVENESS_REQUESTS


class UpstreamState:
    """One way to an upstream: the proxy itself, or one of the ssh tunnels to it (a lane), with its health
    and how many relayed connections it carries now."""

    __slots__ = (
        "upstream", "addresses", "healthy", "failures", "tunnel", "still_there", "rank", "active", "early_data",
        "keeps_early_data",
    )  # fmt: skip

    def __init__(self, upstream: Upstream, addresses, tunnel=None, config: Config | None = None, rank: int = 0):
        self.upstream = upstream
        self.addresses = addresses  # where to connect: the proxy, or the local end of its ssh tunnel
        self.healthy = True
        self.failures = 0
        self.tunnel = tunnel
        self.rank = rank  # the upstream's place in the configuration: lanes of one upstream share it
        self.active = 0  # relayed connections through it now
        # Direct connections have no proxy in between: a FIN is the server's own.
        self.still_there = StillThere(self, config) if config is not None and upstream.scheme != "direct" else None
        self.early_data = config.early_data_for(upstream) if config is not None else "off"  # on, off or auto
        self.keeps_early_data: bool | None = None  # auto: what the probe found (relay.net.early_data); None: not yet

    @property
    def sends_early_data(self) -> bool:
        """Whether a TLS client's ClientHello goes with the CONNECT request (see relay.proto.early_data)."""
        return self.early_data == "on" or (self.early_data == "auto" and self.keeps_early_data is True)

    @property
    def usable(self) -> bool:
        return self.healthy and (self.tunnel is None or self.tunnel.up)

    @property
    def label(self) -> str:
        """The upstream, and which of its ssh tunnels when it has several."""
        return self.tunnel.label if self.tunnel is not None and self.tunnel.label else str(self.upstream)


PROBE_TIMEOUT = 1.0  # seconds
HEALTH_ANSWER_LIMIT = 65536  # bytes of a health check's answer read at most (squid's 400 page: 3.5 KiB)
DIRECT = Upstream("direct")
# Upstreams that can be asked for a hostname (SOCKS4 and direct only take addresses).
NAMED_SCHEMES = ("http", "https", "socks5", "socks4a")
# retried-by-ip= when the by-address attempt, started because the proxy was slow to answer for
# the name, answered first.
SLOW_NAME = "slow-name"
_NO_MORE = object()


class StillThere:
    """For --confirm-eof: is the proxy still there? A new connection to it, a request it answers by
    itself (relay.proto.liveness), then a reset.

    One object per upstream, so the pump shares one probe among its connections.
    """

    __slots__ = ("state", "mark", "timeout", "request")

    def __init__(self, state: UpstreamState, config: Config):
        # A FIN waits for this at most: beyond it the answer counts as "still there".
        self.state, self.mark, self.timeout = state, config.mark, min(config.connect_timeout, PROBE_TIMEOUT)
        self.request = LIVENESS_REQUESTS[state.upstream.protocol]

    async def __call__(self) -> bool:
        state = self.state
        if state.tunnel is not None and not state.tunnel.up:
            return False
        deadline = trio.current_time() + self.timeout
        try:
            sock = await connect(state.addresses, mark=self.mark, timeout=self.timeout)
        except UpstreamError as exc:
            # Only a definite answer means gone (refused, unreachable). A timeout may be a busy proxy,
            # and our own shortages say nothing about it: then the FIN goes through, as without the option.
            return not exc.proxy_fault or exc.reason == "connect-timeout"
        try:
            if state.upstream.scheme == "https":
                # A finished TLS handshake is a program's answer (a dying listener's kernel gives none).
                await tls_stream(sock, state.upstream, max(deadline - trio.current_time(), 0.001))
                return True
            await write_all(sock, self.request)
            # Bytes or a close: a program answered. No answer in time: busy, as above.
            await receive_some(sock, 1, deadline)
        except UpstreamError as exc:
            return exc.reason == "handshake-timeout"  # busy, as above; refused or reset: gone
        except OSError:
            return False  # reset unread: accepted by the kernel for a listener that is going away
        finally:
            reset(sock)
        return True


class Attempts:
    """The order in which one connection tries to open its tunnel, as the attempts fail.

    Each healthy upstream in turn; through each, by the sniffed name if it can
    take names and, if the proxy cannot reach that name, once more by address.
    A failure that is not the proxy's own (the destination refused) ends it
    there; a proxy's failure counts against its health and the next one is
    tried. Direct (no upstream): one attempt. Nothing has reached the client
    before the tunnel opens, so nothing is lost by trying again.

    A race: when the proxy is slow to answer for the name (--name-wait), the
    address is asked through the same upstream alongside (``race``), and the
    first to open wins. One failing leaves the other going; when both have
    failed, a proxy's fault among them counts once against its health, and
    the next upstream is tried only if both were the proxy's fault.

    ``by_name_only`` (a fake destination, see relay.net.fake_ips): only the
    upstreams that take names, by name alone, and no race.
    """

    __slots__ = (
        "pool", "record", "dst", "by_name_only", "states", "state", "target", "error", "racing", "first_failure",
    )  # fmt: skip

    def __init__(
        self, pool: "UpstreamPool", candidates: list[UpstreamState], direct: bool, dst, record, by_name_only=False
    ):
        self.pool, self.record, self.dst = pool, record, dst
        # A fake destination (fake-ip mode): its address means nothing beyond the relay, so only its name is asked
        # for, of the upstreams that take names; never by address, never direct.
        self.by_name_only = by_name_only
        states = [None] if direct else candidates
        self.error = UpstreamError("no healthy upstream", "no-healthy-upstream", Fault.PROXY)
        if by_name_only:
            named = [state for state in states if state is not None and state.upstream.scheme in NAMED_SCHEMES]
            if states and not named:
                self.error = UpstreamError(
                    "a fake address is opened by name, and no upstream for it takes names",
                    "no-named-upstream",
                    Fault.RELAY,
                )
            states = named
        self.states = iter(states)
        self.state: UpstreamState | None = None
        self.target: tuple[str, int] | None = None  # what to ask for next; None: nothing left
        self.racing = False  # a by-name and a by-address attempt are both under way (or one failed)
        self.first_failure: UpstreamError | None = None  # the race's attempt that failed first
        self._next_upstream()

    def next(self) -> tuple[Upstream, list, tuple[str, int]]:
        """(upstream, its addresses, target) to try now; raises the UpstreamError that ends it all."""
        if self.target is None:
            raise self.error
        if self.state is None:
            return DIRECT, [], self.target
        return self.state.upstream, self.state.addresses, self.target

    def may_race(self) -> bool:
        """Whether the attempt now asks a proxy for a name, whose retry would be by address."""
        return self.state is not None and self.target != self.dst and not self.racing and not self.by_name_only

    def race(self) -> tuple[Upstream, list, tuple[str, int]]:
        """The by-address attempt to run alongside the by-name one (see may_race), through the same upstream."""
        self.racing, self.first_failure = True, None
        self.record.retried = SLOW_NAME
        return self.state.upstream, self.state.addresses, self.dst

    def failed(self, error: UpstreamError, racer: bool = False) -> bool:
        """An attempt failed (``racer``: the by-address one of a race). Whether to call next() now;
        False while the other attempt of a race is still under way."""
        if self.racing:
            if self.first_failure is None:
                self.first_failure = error
                if not racer and error.retry_by_address:  # the proxy cannot reach the name, as below
                    self.record.retried = error.reason
                return False
            self.racing = False
            by_name, by_address = (self.first_failure, error) if racer else (error, self.first_failure)
            self.first_failure = None
            self._race_lost(by_name, by_address)
            return True
        self._ends_with(error)
        if (
            self.target != self.dst and error.retry_by_address and not self.by_name_only
        ):  # the proxy cannot reach the name
            self.record.retried = error.reason
            self.target = self.dst
        elif self.state is not None and error.proxy_fault:
            self.pool.failed(self.state, error)
            self._next_upstream()
        else:
            self.target = None
        return True

    def succeeded(self, racer: bool = False) -> UpstreamState | None:
        """The upstream that opened it (None: direct); ``racer``: the by-address attempt of a race won."""
        if self.racing and not racer:
            self.record.retried = None  # the name answered first: the tunnel is by name after all
        self.racing, self.first_failure = False, None
        if self.state is not None:
            self.pool.succeeded(self.state)
        return self.state

    def _race_lost(self, by_name: UpstreamError, by_address: UpstreamError) -> None:
        """Both attempts of a race failed. What the proxy said of the destination (a target's fault)
        is worth more than its own failure; between equals, the address's (what the client asked for)."""
        proxy_faults = [error for error in (by_address, by_name) if error.proxy_fault]
        if proxy_faults:
            self.pool.failed(self.state, proxy_faults[0])
        if len(proxy_faults) == 2:
            self._ends_with(by_address)
            self._next_upstream()
            return
        useful = by_name if by_name.fault is Fault.TARGET and by_address.fault is not Fault.TARGET else by_address
        self._ends_with(useful)
        self.target = None

    def _ends_with(self, error: UpstreamError) -> None:
        """The error the connection ends with, and whose fault it says, if nothing else is tried."""
        self.error = error
        self.record.fault = error.fault

    def _next_upstream(self) -> None:
        state = next(self.states, _NO_MORE)
        if state is _NO_MORE:
            self.state, self.target = None, None
            return
        self.state = state
        upstream = DIRECT if self.state is None else self.state.upstream
        self.record.via = upstream
        name = self.record.name
        self.target = (name, self.dst[1]) if name is not None and upstream.scheme in NAMED_SCHEMES else self.dst


class UpstreamPool:
    def __init__(self, config: Config, metrics, dialer=None):
        self.config = config
        self.metrics = metrics
        self.dialer = dialer  # for health checks with --health-target
        self.states: list[UpstreamState] = []
        self._turn = itertools.count()
        self._proxy_addresses: set[tuple[str, int]] = set()

    async def resolve(self, tunnels=None) -> None:
        """Resolve each proxy once; with ssh tunnels, connect to their local ends instead (a state each).
        Loads https:// upstreams' certificates too: a bad file is a ConfigError here, not a failure per connection."""
        check_contexts(self.config.upstreams)
        for rank, upstream in enumerate(self.config.upstreams):
            lanes = [tunnel for tunnel in tunnels or () if tunnel.upstream == upstream] or [None]
            for tunnel in lanes:
                addresses = []
                if tunnel is not None:
                    addresses = await resolve(*tunnel.local_address)
                elif upstream.scheme != "direct":
                    try:
                        addresses = await resolve(upstream.host, upstream.port)
                    except OSError as exc:
                        raise ConfigError(f"cannot resolve upstream host {upstream.host!r}: {exc.strerror}") from None
                state = UpstreamState(upstream, addresses, tunnel, self.config, rank)
                self.states.append(state)
                self._proxy_addresses.update(address[:2] for _, address in addresses)
                self.metrics.set_upstream_healthy(state.label, True)

    def proxy_addresses(self) -> set[tuple[str, int]]:
        """Every address a proxy of ours listens on (a destination equal to one is a loop)."""
        return self._proxy_addresses

    def candidates(self) -> list[UpstreamState]:
        """The usable states in the order to try them; of one upstream's ssh tunnels, the one carrying
        the fewest connections first."""
        usable = sorted((state for state in self.states if state.usable), key=lambda state: (state.rank, state.active))
        if self.config.upstream_strategy == "round-robin" and usable:
            start = next(self._turn) % len(usable)
            usable = usable[start:] + usable[:start]
        return usable

    def succeeded(self, state: UpstreamState) -> None:
        state.failures = 0
        if not state.healthy:
            self._set_health(state, True, "a connection succeeded")

    def failed(self, state: UpstreamState, error: UpstreamError) -> None:
        state.failures += 1
        if error.reason == "tls-certificate":  # it will not change by itself: no waiting for more failures
            state.failures = max(state.failures, self.config.health_failures)
        if state.healthy and state.failures >= self.config.health_failures:
            self._set_health(state, False, f"{state.failures} failures in a row, the last: {error}")

    def _set_health(self, state: UpstreamState, healthy: bool, why: str) -> None:
        state.healthy = healthy
        self.metrics.set_upstream_healthy(state.label, healthy)
        log.warning("upstream %s is %s: %s", state.label, "healthy again" if healthy else "unhealthy", why)

    async def run_health_checks(self) -> None:
        async with trio.open_nursery() as nursery:
            lanes: dict[Upstream, list[UpstreamState]] = {}  # the ssh tunnels to one proxy share its verdict
            for state in self.states:
                if state.upstream.scheme != "direct":
                    nursery.start_soon(self._check_forever, state)
                if state.early_data == "auto":
                    lanes.setdefault(state.upstream, []).append(state)
            for upstream, states in lanes.items():
                if self.config.health_target is None:
                    log.info(
                        "upstream %s: no early data after CONNECT: --early-data auto finds out whether a proxy "
                        "keeps it with a probe to --health-target (a TLS server), and there is none",
                        upstream,
                    )
                else:
                    nursery.start_soon(early_data.find_out, self.dialer, states, self.config)

    async def _check_forever(self, state: UpstreamState) -> None:
        while True:
            await trio.sleep(self.config.health_interval)
            if state.healthy and len(self.states) == 1:
                # Alone, it has nowhere to fail over to, and failing connections mark it down:
                # checks are only needed to find it back, and each costs a line in the proxy's log.
                continue
            try:
                await self.check(state)
            except UpstreamError as exc:
                if exc.reason == ends.CANCELLED:
                    return  # the relay is shutting down: that says nothing about the upstream
                # A failed active check is decisive: no waiting for more failures in a row.
                state.failures = max(state.failures, self.config.health_failures - 1)
                self.failed(state, exc)
                continue
            self.succeeded(state)

    async def check(self, state: UpstreamState) -> None:
        """One active check; raises UpstreamError. With --health-target a full handshake to it;
        otherwise a connect and a question the proxy answers itself (relay.proto.liveness)."""
        config = self.config
        if state.tunnel is not None and not state.tunnel.up:
            raise UpstreamError("its ssh tunnel is down", "connect-tunnel-down", Fault.PROXY)
        if config.health_target is not None:
            sock, _ = await self.dialer.open_async(
                state.upstream,
                state.addresses,
                config.health_target,
                mark=config.mark,
                connect_timeout=config.connect_timeout,
                handshake_timeout=config.handshake_timeout,
            )
            reset(sock)
            return
        sock = await connect(state.addresses, mark=config.mark, timeout=config.connect_timeout)
        question = HEALTH_QUESTIONS.get(state.upstream.protocol)
        if question is None:  # SOCKS4: the connect is the check
            reset(sock)
            return
        try:
            if state.upstream.scheme == "https":  # the certificate checked, then the question inside TLS
                await tls_answered(sock, state.upstream, question[0], config.handshake_timeout)
                reset(sock)
                return
            await answered(sock, *question, config.handshake_timeout)
        except OSError as exc:
            reset(sock)
            raise handshake_failure(exc) from None
        except BaseException:
            reset(sock)
            raise
        sock.close()  # a FIN: the answer was read to its end


async def answered(sock, question: bytes, answer_size: int | None, timeout: float) -> None:
    """Ask ``question`` and read the answer (``answer_size`` bytes, or None: until the proxy closes);
    raises UpstreamError if no byte of it comes within ``timeout``. Once it has answered, its close
    is awaited for PROBE_TIMEOUT at most: the answer is what counts."""
    deadline = trio.current_time() + timeout
    await write_all(sock, question)
    got = 0
    while got < (answer_size or HEALTH_ANSWER_LIMIT):
        data = await receive_some(sock, HEALTH_ANSWER_LIMIT, deadline)
        if not data:
            if got:
                return
            if data is None:
                raise handshake_timed_out(timeout)
            raise UpstreamError("the proxy closed without answering a health check", "proxy-closed", Fault.PROXY)
        if not got:
            deadline = min(deadline, trio.current_time() + PROBE_TIMEOUT)
        got += len(data)


async def tls_answered(sock, upstream: Upstream, question: bytes, timeout: float) -> None:
    """``answered`` inside TLS: the handshake (certificate checked), the question, and the first bytes of
    an answer within ``timeout`` in all; raises UpstreamError."""
    deadline = trio.current_time() + timeout
    stream = await tls_stream(sock, upstream, timeout)
    try:
        with trio.fail_at(deadline):
            await stream.send_all(question)
            data = await stream.receive_some(HEALTH_ANSWER_LIMIT)
    except trio.TooSlowError:
        raise handshake_timed_out(timeout) from None
    except trio.BrokenResourceError as exc:
        raise handshake_failure(stream_failure(exc)) from None
    if not data:
        raise UpstreamError("the proxy closed without answering a health check", "proxy-closed", Fault.PROXY)
