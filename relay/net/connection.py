"""One relayed connection, from accept to its end.

A connection moves through named states; TRANSITIONS says which may follow
which, and any other move is a bug of ours (it raises). Whatever ends it,
``Connection.end()`` runs exactly once: it closes what the connection still
holds and gives back its slot, its per-source count and its waiting-room
turn, then writes the log line and counts the metric.

One connection, read top to bottom:
  relay.net.listener     accepts it, holding a slot for it
  relay.net.connections  what every connection shares (Connections.accepted)
  relay.net.admission    loops, destination policy, per-source cap (Connection.admit)
  relay.dns.names        the name its client's DNS answer gave (Connection.admit): then it need not wait
  relay.net.waiting      until its client's first bytes, without a task (Connection.first_bytes)
  relay.proto.sniff      the name in them (TLS SNI, HTTP Host), which wins over the DNS one
  relay.net.upstreams    which upstream and target, in which order (Attempts)
  relay.net.dial         its tunnel, without a task (Connection.dial, name_slow, won, attempt_failed)
  relay.net.http_forward plain HTTP in absolute form instead, in a task (Connection.forward)
  relay.net.pump         the relayed bytes, in the engine, until either side ends (Connection.relayed)
"""

import enum
import logging
import socket
import time
from typing import TYPE_CHECKING

import trio

from relay import ends
from relay.addresses import format_address
from relay.config import Config
from relay.ends import client_failure, local_failure
from relay.logs import conn_log, log
from relay.net import admission
from relay.net.fake_ips import NAME_FROM as FAKE_IP_NAME_FROM
from relay.net.fake_ips import UNKNOWN, fake_ip_name, refuse_unknown
from relay.net.faults import UpstreamError
from relay.net.http_forward import NeedsTunnel, Switched, forward
from relay.net.sockets import receive_some, reset
from relay.net.upstreams import NAMED_SCHEMES, Attempts, UpstreamPool
from relay.proto.early_data import early_tls_records
from relay.proto.sniff import HTTP, MAX_SNIFF_BYTES, NOT_RECOGNISED, TLS, Sniffed, Sniffer

if TYPE_CHECKING:
    from relay.net.connections import Connections


class State(enum.Enum):
    ACCEPTED = "accepted"  # holds a slot; admission not decided yet
    ADMITTED = "admitted"  # counted against its source; its first bytes not read yet
    WAITING = "waiting"  # for its client's first bytes: in the waiting room, or a task reading the rest
    DIALING = "dialing"  # its tunnel is being opened, attempt after attempt
    FORWARDING = "forwarding"  # plain HTTP forwarded in absolute form, in a task
    RELAYING = "relaying"  # both sockets belong to the pump
    ENDED = "ended"


TRANSITIONS = {
    State.ACCEPTED: {State.ADMITTED, State.ENDED},
    State.ADMITTED: {State.WAITING, State.DIALING, State.FORWARDING, State.ENDED},
    State.WAITING: {State.DIALING, State.FORWARDING, State.ENDED},
    # An Upgrade is tunnelled as it came (DIALING), or forwarded and, after the 101, relayed.
    State.FORWARDING: {State.DIALING, State.RELAYING, State.ENDED},
    State.DIALING: {State.RELAYING, State.ENDED},
    State.RELAYING: {State.ENDED},
    State.ENDED: set(),
}


class InvalidTransition(RuntimeError):
    """A connection was moved where TRANSITIONS does not allow: a bug of the relay's."""


class Connection:
    """One client connection: its state, what it holds, and what its log line says."""

    __slots__ = (
        "owner", "sock", "peer", "dst", "config", "pool", "started", "sniff_deadline", "state",
        "counted", "silent_turn", "described", "first", "early", "early_sent", "candidates", "attempts",
        "attempt_started",
        "dialing", "racer", "racer_started", "name", "name_from", "dns_name", "fake_name", "retried", "via", "fault",
        "source", "lane", "up", "down", "http_requests", "http_spliced",
    )  # fmt: skip

    def __init__(self, owner: "Connections", sock: socket.socket, peer, config: Config, pool: UpstreamPool):
        owner.open.add(self)
        self.owner, self.sock, self.peer = owner, sock, peer  # sock: None once closed or the pump's
        self.config, self.pool = config, pool  # as they were at accept: a reload affects new connections only
        self.started = time.monotonic()
        self.sniff_deadline = trio.current_time() + config.sniff_timeout
        self.state = State.ACCEPTED
        self.dst = None
        self.counted = False  # in owner.per_source
        self.silent_turn = False  # holds one of the waiting room's turns for silent connections
        self.described = False  # its first bytes are known: it gets a log line
        self.first = b""  # the client's bytes read so far: they go upstream first
        self.early = b""  # the start of them an HTTP proxy may get with CONNECT: a TLS ClientHello
        self.early_sent = 0  # how many of them the attempt under way sent with its CONNECT
        self.candidates = []
        self.attempts: Attempts | None = None
        self.attempt_started = 0.0
        self.dialing = None  # the attempt under way (relay.net.dial.Dialing), while dialing
        self.racer = None  # the by-address attempt racing a slow by-name one
        self.racer_started = 0.0
        self.name = None  # the hostname asked for, when one is used
        self.name_from = None  # where that name came from: "dns", "sni" or "host"
        self.dns_name = None  # the usable name the relay's DNS service gave this client for dst, if any
        self.fake_name = None  # fake-ip mode: the name dst stands for; it can be reached by that name only
        self.retried = None  # why we asked by address: the proxy's refusal of the name, or "slow-name"
        self.via = None
        self.fault = None  # whose fault the failure it would end with was (relay.net.faults.Fault)
        self.source = None  # the upstream socket's local address, while it is in owner.own_sources
        self.lane = None  # the UpstreamState it relays through, while it counts in its ``active``
        self.up = self.down = 0
        self.http_requests = None  # forwarded in absolute form, when not tunnelled
        self.http_spliced = 0  # ...and the bytes of their bodies that went socket to socket

    def move(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"connection from {format_address(self.peer)}: {self.state.value} -> {state.value}")
        self.state = state

    # -- accepted: admission ------------------------------------------------------------

    def admit(self) -> None:
        owner = self.owner
        owner.metrics.connection_accepted()
        try:
            self.dst = owner.original_destination(self.sock, self.config.mode)
        except OSError as exc:
            self.client_failed(exc)
            return
        refusal = owner.refusal(self.config, self.peer, self.dst)
        if refusal:
            ended, why, limiter, key = refusal
            limiter.warning(key, f"refused {format_address(self.peer)} -> {format_address(self.dst)}: {why}")
            self.end(ended)
            return
        owner.per_source[self.peer[0]] = owner.per_source.get(self.peer[0], 0) + 1
        self.counted = True
        self.move(State.ADMITTED)
        if owner.waiting.closed:  # shutting down: an accept loop woken just before it was cancelled
            self.end(ends.CANCELLED)
            return
        try:
            self.sock.setblocking(False)
        except OSError as exc:
            self.client_failed(exc)
            return
        fake_name = fake_ip_name(owner.fake_ips, self.dst[0])
        if fake_name is UNKNOWN:
            self.described = True
            self.end(refuse_unknown(owner.warnings, self.peer, self.dst))
            return
        self.fake_name = fake_name
        self.dns_name = self.usable_name(owner.names.name_for(self.peer[0], self.dst[0], trio.current_time()))
        self.first_bytes(spoke=True)

    # -- its first bytes ------------------------------------------------------------------

    def left_waiting_room(self, spoke: bool) -> None:
        """From the waiting room: the client spoke (or closed), or stayed silent for --sniff-timeout,
        and then holds one of the room's turns until it has dialed."""
        self.silent_turn = not spoke
        self.first_bytes(spoke)

    def first_bytes(self, spoke: bool) -> None:
        """Sniff what the client sent, then open the tunnel or forward. Without a task when its
        first bytes are all here (the common case) or it was silent; a client that has not spoken
        yet waits in the waiting room, unless its server speaks first or its DNS answer named the destination
        (needs_first_bytes);
        a task only for the rest of its first bytes and for plain HTTP forwarding."""
        sniffer = None
        try:
            if spoke and wants_sniffing(self.config, self.pool):
                data = self.sock.recv(MAX_SNIFF_BYTES)
                sniffer = Sniffer()
                if data:
                    sniffer.receive_data(data)
                else:  # closed before a word: connected by address, it may still want to hear
                    sniffer.give_up()
        except BlockingIOError:
            if self.needs_first_bytes():
                self.wait_for_first_bytes()
                return
            sniffer = None  # a server-first port or the DNS name: what the client sends goes through the tunnel
        except OSError as exc:
            self.client_failed(exc)
            return
        except Exception:  # the client's bytes must not take the accept loop down with them
            self.internal_error()
            return
        if sniffer is not None and sniffer.result is None:
            self.move_unless(State.WAITING)
            self.owner.tasks.start_soon(self.in_task, self.sniff_rest, sniffer)
            return
        try:
            self.go_on(*((sniffer.result, sniffer.buffered) if sniffer else (NOT_RECOGNISED, b"")))
        except Exception:
            self.internal_error()

    def needs_first_bytes(self) -> bool:
        """Whether a client that has not spoken yet must be waited for. Not when the destination port is a
        protocol's whose server speaks first (its client says nothing until the tunnel brings the server's
        greeting), nor when its DNS answer named the destination, unless plain HTTP may have to be forwarded in
        absolute form: only its bytes can tell, and most HTTP proxies refuse CONNECT to other ports than 443."""
        if self.dst[1] in self.config.server_first_ports:
            return False
        named = self.dns_name is not None or self.fake_name is not None
        return not named or forwards_http(self.config, self.pool.states)

    def wait_for_first_bytes(self) -> None:
        self.move_unless(State.WAITING)
        try:
            self.owner.waiting.add(self.sock, self, self.sniff_deadline)
        except OSError as exc:  # e.g. epoll's watch limit: the relay's shortage, not the client's
            peer = format_address(self.peer)
            self.owner.warnings.warning(f"wait-{exc.errno}", f"cannot take a connection from {peer}: {exc}")
            self.end(local_failure(exc.errno))

    async def sniff_rest(self, sniffer: Sniffer) -> None:
        """Read until the first bytes are recognised or --sniff-timeout after the accept: a client
        that stops in the middle is then connected by address, as a silent one is."""
        while sniffer.result is None:
            data = await receive_some(self.sock, MAX_SNIFF_BYTES, self.sniff_deadline)
            if not data:  # None: the client is still silent at the deadline
                break
            sniffer.receive_data(data)
        self.go_on(sniffer.give_up(), sniffer.buffered)

    def go_on(self, sniffed: Sniffed, first: bytes) -> None:
        """What the connection will try, now that its first bytes are known; then try it."""
        config = self.config
        self.described = True
        self.first = first
        self.early = early_tls_records(first) if sniffed.protocol == TLS else b""
        if sniffed.hostname:  # what the client itself says wins over what its DNS answer said
            hostname, source = sniffed.hostname, "sni" if sniffed.protocol == TLS else "host"
        elif self.fake_name:
            hostname, source = self.fake_name, FAKE_IP_NAME_FROM
        else:
            hostname, source = self.dns_name, "dns"
        self.name = self.usable_name(hostname)
        if self.name is None and self.fake_name:  # a fake address goes nowhere by address: its name, always
            hostname, source = self.fake_name, FAKE_IP_NAME_FROM
            self.name = hostname
        if self.name:
            self.name_from = source
            self.owner.metrics.connection_named(source)
        direct = admission.bypassed(config, self.dst, hostname)
        self.candidates = [] if direct else self.pool.candidates()
        if sniffed.protocol == HTTP and forwards_http(config, self.candidates):
            self.move(State.FORWARDING)
            self.owner.tasks.start_soon(self.in_task, self.forward)
            return
        by_name_only = self.fake_name is not None
        self.attempts = Attempts(self.pool, self.candidates, direct, self.dst, self, by_name_only=by_name_only)
        self.move(State.DIALING)
        self.dial()

    def usable_name(self, name: str | None) -> str | None:
        """``name`` if a proxy may be asked for it: sniffing is on and it is not one of this router's
        own names (through a proxy on its loopback, that would reach the router itself)."""
        if name is None or not self.config.sniff or self.owner.own_names(name):
            return None
        return name

    # -- what waits on the client, in a task -------------------------------------------------

    async def in_task(self, work, *args) -> None:
        """Run ``work``: whatever it raises ends this connection, unless it was handed on."""
        try:
            await work(*args)
        except OSError as exc:
            if self.in_task_still():
                self.client_failed(exc)
        except Exception:
            if self.in_task_still():
                self.internal_error()
            else:  # a bug after the dialer took it: the dialer ends it
                log.exception("internal error after handing on %s", format_address(self.peer))
        except BaseException:  # cancelled (shutdown): the client must not see a clean end of data
            if self.in_task_still():
                self.end(ends.CANCELLED)
            raise

    def in_task_still(self) -> bool:
        """Whether the task still has it: not handed to the dialer or the pump, not ended."""
        return self.state in (State.WAITING, State.FORWARDING)

    async def forward(self) -> None:
        """Plain HTTP to an HTTP proxy in absolute form (see relay.net.http_forward)."""
        self.sock = trio.socket.from_stdlib_socket(self.sock)
        try:
            ended, detail, clean = await forward(
                self.sock, self.first, self, self.config, self.pool, self.candidates, self.owner.dialer.preconnect
            )
        except NeedsTunnel as exc:  # e.g. a WebSocket upgrade: tunnel it as it came
            self.first = exc.data
            self.attempts = Attempts(self.pool, self.candidates, False, self.dst, self)
            self.move(State.DIALING)
            self.dial()
            return
        except Switched as exc:  # a forwarded upgrade the proxy accepted: a tunnel from here on
            self.relay_switched(exc)
            return
        if ended == ends.CLIENT_PROTOCOL_ERROR:  # what a client sends costs a line per interval at most
            peer = format_address(self.peer)
            self.owner.warnings.warning(ended, f"connection from {peer}: malformed HTTP request, refused ({ended})")
        self.end(ended, detail, clean=clean)

    # -- its tunnel, without a task -------------------------------------------------------

    def dial(self) -> None:
        """The next attempt at opening the tunnel (see Attempts), or the end if none is left."""
        try:
            upstream, addresses, target = self.attempts.next()
        except UpstreamError as exc:
            if exc.reason in (ends.CANCELLED, "internal-error"):  # shutting down; a bug, logged already
                self.end(ends.CANCELLED if exc.reason == ends.CANCELLED else ends.ERROR)
            else:
                self.end(f"refused:{exc.reason}", str(exc))
            return
        self.attempt_started = time.monotonic()
        self.dialing = self.racer = None  # every earlier attempt is over
        on_slow = self.name_slow if self.attempts.may_race() else None
        # Each attempt sends them again (a refusal lost them with its connection); a racer never does.
        state = self.attempts.state
        early = self.early if state is not None and state.sends_early_data else b""
        self.early_sent = len(early)
        dialing = self.open_attempt(upstream, addresses, target, self.opened, self.failed, on_slow, early)
        if dialing is not None:
            self.dialing = dialing

    def open_attempt(self, upstream, addresses, target, on_open, on_fail, on_slow=None, early=b""):
        """One attempt through the Dialer: its Dialing while it is under way, else None (over already:
        its callback, called inside, may have begun the next attempt, which is the one to keep);
        ``early``: the client's first bytes that go with an HTTP CONNECT request."""
        config = self.config
        dialing = self.owner.dialer.open(
            upstream,
            addresses,
            target,
            mark=config.mark,
            connect_timeout=config.connect_timeout,
            handshake_timeout=config.handshake_timeout,
            on_open=on_open,
            on_fail=on_fail,
            slow_after=config.name_wait if on_slow else None,
            on_slow=on_slow,
            early_data=early,
        )
        return dialing if dialing.under_way else None

    def name_slow(self) -> None:
        """From the Dialer: the proxy has not answered for the name within --name-wait. Ask it for the
        address too; the first to open wins. The client's bytes wait for the winner (the Dialer sends
        only the proxy's handshake). If the by-name attempt sent a ClientHello with its CONNECT, the
        destination may see that twice, on two connections, one closed unanswered: as from any Happy
        Eyeballs client (relay.proto.early_data sends nothing else early)."""
        try:
            self.racer_started = time.monotonic()
            racer = self.open_attempt(*self.attempts.race(), self.racer_opened, self.racer_failed)
            if racer is not None:
                self.racer = racer
        except Exception:
            self.internal_error()

    def failed(self, error: UpstreamError) -> None:
        """From the Dialer: the attempt under way failed."""
        self.attempt_failed(error, racer=False)

    def racer_failed(self, error: UpstreamError) -> None:
        """From the Dialer: the by-address attempt of a race failed."""
        self.attempt_failed(error, racer=True)

    def attempt_failed(self, error: UpstreamError, racer: bool) -> None:
        if not racer:
            self.early_sent = 0  # what it sent early went nowhere; the next attempt sends it again
        self.owner.metrics.attempt_failed(str(self.via), error.fault.value)
        try:
            if self.attempts.failed(error, racer):
                self.dial()
        except Exception:
            self.internal_error()

    def opened(self, upstream: socket.socket, early: bytes) -> None:
        """From the Dialer: the attempt under way opened the tunnel."""
        self.won(upstream, early, racer=False)

    def racer_opened(self, upstream: socket.socket, early: bytes) -> None:
        """From the Dialer: the by-address attempt of a race opened the tunnel."""
        self.won(upstream, early, racer=True)

    def won(self, upstream: socket.socket, early: bytes, racer: bool) -> None:
        """A tunnel is open: the other attempt of a race, if any, is closed unheard (its proxy's
        bytes never reach the client), and both sides go to the pump."""
        owner, config = self.owner, self.config
        try:
            self.stop_dialing()
            state = self.attempts.succeeded(racer)
            if state is not None:  # counted while it relays: the next connection takes the least busy lane
                self.lane, state.active = state, state.active + 1
            if racer:
                self.early_sent = 0  # the racer sent none: the client's bytes all go now
            started = self.racer_started if racer else self.attempt_started
            owner.metrics.handshake_done(str(self.via), time.monotonic() - started)
            self.source = upstream.getsockname()[:2]
            self.add_to_pump(
                upstream,
                self.first[self.early_sent :],
                early,
                confirm_eof=state.still_there if config.confirm_eof and state else None,
            )
        except OSError as exc:  # e.g. epoll's watch limit: the relay's shortage, not the client's
            reset(upstream)
            self.source = None
            self.end(local_failure(exc.errno))
            return
        except Exception:
            reset(upstream)
            self.source = None
            self.internal_error()
            return
        self.sock = None  # the pump's now, and relayed() will end the connection
        self.move(State.RELAYING)
        owner.own_sources.add(self.source)
        self.give_back_silent_turn()

    def add_to_pump(self, upstream, to_upstream_first: bytes, to_client_first: bytes, confirm_eof=None) -> None:
        """Both sockets to the pump, with the bytes each side is owed first (see Pump.add)."""
        config = self.config
        self.owner.pump.add(
            self.sock,
            upstream,
            self,
            to_upstream_first=to_upstream_first,
            to_client_first=to_client_first,
            idle_timeout=config.idle_timeout,
            half_closed_timeout=config.half_closed_timeout,
            pipe_size=config.pipe_size,
            confirm_eof=confirm_eof,
        )

    def relay_switched(self, switched: Switched) -> None:
        """After a 101 to a forwarded upgrade, both sockets go to the pump, as a tunnel's."""
        try:
            self.add_to_pump(switched.proxy, switched.to_proxy, switched.to_client)
        except OSError as exc:  # e.g. epoll's watch limit: the relay's shortage, not the client's
            reset(switched.proxy)
            self.end(local_failure(exc.errno))
            return
        self.sock = None  # the pump's now, and relayed() will end the connection
        self.move(State.RELAYING)

    def relayed(self, ended: str, sent_up: int, sent_down: int) -> None:
        """From the pump: done relaying (it closed both sockets). A forwarded upgrade counted its HTTP before."""
        # The early bytes went with the CONNECT.
        self.up, self.down = self.up + sent_up + self.early_sent, self.down + sent_down
        self.end(ended)

    # -- its end -------------------------------------------------------------------------

    def end(self, ended: str, detail: str | None = None, *, clean: bool = False) -> None:
        """The one way a connection ends: what it holds is let go, then it is logged and counted.
        A client socket still held is reset, or closed with a FIN when ``clean``."""
        self.move(State.ENDED)
        owner = self.owner
        self.stop_dialing()
        if self.sock is not None:
            if clean:
                self.sock.close()
            else:
                reset(self.sock)
            self.sock = None
        if self.source is not None:
            owner.own_sources.discard(self.source)
            self.source = None
        if self.lane is not None:
            self.lane.active -= 1
            self.lane = None
        self.give_back_silent_turn()
        if self.counted:
            left = owner.per_source.pop(self.peer[0]) - 1
            if left:
                owner.per_source[self.peer[0]] = left
            self.counted = False
        owner.slots.release()
        owner.open.discard(self)
        if ended.startswith("refused:"):  # for the status page: a tuple, built only for a failure
            owner.failures.append((time.time(), self.peer, self.dst, self.name, self.via, ended, detail, self.fault))
        if self.described:
            self.log(ended, detail)
        owner.metrics.connection_closed(ended, self.up, self.down)

    def stop_dialing(self) -> None:
        """Close whatever attempt is still under way, without its callbacks (nothing if none is)."""
        for dialing in (self.dialing, self.racer):
            if dialing is not None:
                self.owner.dialer.cancel(dialing)
        self.dialing = self.racer = None

    def end_unless_ended(self, ended: str) -> None:
        if self.state is not State.ENDED:
            self.end(ended)

    def move_unless(self, state: State) -> None:
        if self.state is not state:
            self.move(state)

    def give_back_silent_turn(self) -> None:
        if self.silent_turn:
            self.silent_turn = False
            self.owner.waiting.done_silent()

    def client_failed(self, exc: OSError) -> None:
        """The client's socket failed: reset it and say so (rate-limited)."""
        self.owner.warnings.warning(f"conn-{exc.errno}", f"connection from {format_address(self.peer)} failed: {exc}")
        self.end(client_failure(exc.errno))

    def internal_error(self) -> None:
        """A bug must cost one connection, not the relay and every other connection."""
        dst = format_address(self.dst) if self.dst else "?"
        log.exception("internal error while relaying %s -> %s", format_address(self.peer), dst)
        self.end_unless_ended(ends.ERROR)

    def log(self, ended: str, detail: str | None) -> None:
        """The per-connection log line (-v)."""
        if not conn_log.isEnabledFor(logging.INFO):
            return  # most routers run without -v: build nothing
        fields = {"event": "conn", "client": format_address(self.peer), "dst": format_address(self.dst)}
        if self.name:
            fields["name"] = self.name
            fields["name-from"] = self.name_from
        if self.retried:
            fields["retried-by-ip"] = self.retried
        if self.http_requests is not None:
            fields["http-requests"] = self.http_requests
            fields["http-spliced"] = self.http_spliced
        if self.early_sent:
            fields["early-data"] = self.early_sent  # bytes of the client's that went with the CONNECT
        fields.update(
            via=str(self.via or "-"),
            up=self.up,
            down=self.down,
            time=f"{time.monotonic() - self.started:.3f}s",
            end=ended,
        )
        if detail:
            fields["error"] = detail
        if self.fault is not None and ended.startswith("refused:"):
            fields["fault"] = self.fault.value
        text = " ".join(
            f"{key}={value!r}" if key == "error" else f"{key}={value}"
            for key, value in fields.items()
            if key != "event"
        )
        conn_log.info("conn %s", text, extra={"fields": fields})


def wants_sniffing(config: Config, pool: UpstreamPool) -> bool:
    """Whether a connection's first bytes matter: for a name to ask for, a bypassed domain, or
    plain HTTP to forward."""
    return (
        (config.sniff and any(state.upstream.scheme in NAMED_SCHEMES for state in pool.states))
        or bool(config.bypass_domain)
        or forwards_http(config, pool.states)
    )


def forwards_http(config: Config, candidates) -> bool:
    return config.http_mode == "forward" and bool(candidates) and candidates[0].upstream.protocol == "http"
