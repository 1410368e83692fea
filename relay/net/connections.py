"""Every connection of this process: what they share and what admission counts.

New connections take the settings and upstreams held here (a reload replaces
them); each holds a slot of the budget and a count against its source until
its end (relay.net.connection); the dialer, the waiting room and the pump
carry them all.
"""

import errno
import socket
from collections import deque

import trio

from relay import ends, fastpath
from relay.addresses import format_address
from relay.config import Config
from relay.dns.names import NameBook
from relay.logs import RateLimited, log
from relay.net import admission
from relay.net.connection import Connection
from relay.net.dial import Dialer
from relay.net.pump import Pump
from relay.net.upstreams import UpstreamPool
from relay.net.waiting import WaitingRoom

FAILURES_KEPT = 100  # the latest refused connections, for the status page


class Connections:
    """What every connection of this process shares: the settings and upstreams for new ones,
    the slots and per-source counts they hold, and the machinery that carries them."""

    def __init__(self, config: Config, metrics, pool: UpstreamPool, dialer: Dialer, names: NameBook):
        self.config, self.pool = config, pool  # for new connections: a reload replaces both
        self.metrics = metrics
        self.dialer = dialer
        self.names = names
        self.fake_ips = None  # fake-ip mode: relay.dns.fakeip's pool, which names the fake destinations
        self.budget = admission.connection_budget(config)
        self.slots = trio.Semaphore(self.budget)
        self.per_source: dict[str, int] = {}
        # Local addresses of our open upstream sockets: a client coming *from* one is our own traffic looped back.
        self.own_sources: set[tuple[str, int]] = set()
        self.listening: set[tuple[str, int]] = set()
        self.refused_endpoints: set[tuple[str, int]] = set()  # the SSH server
        self.is_local = admission.LocalAddresses()
        self.own_names = admission.OwnNames(self.is_local)
        self.warnings = RateLimited()
        self.refusals = RateLimited(interval=60.0)  # refused destinations: once per destination per minute
        self.pump = Pump(  # its tokens are the connections
            Connection.relayed, engine=config.engine, max_backlog=config.sockmap_backlog
        )
        self.waiting = WaitingRoom(
            lambda sock, connection, spoke: connection.left_waiting_room(spoke),
            lambda sock, connection: connection.end(ends.CANCELLED),  # the room closed: shutting down
        )
        self.tasks: trio.Nursery | None = None  # for what waits on a client, while serving
        # Connections not ended, and the latest refused: read on demand by the status page (relay.status).
        self.open: set[Connection] = set()
        self.failures: deque = deque(maxlen=FAILURES_KEPT)

    def __len__(self) -> int:
        return len(self.open)

    def accepted(self, sock: socket.socket, peer) -> None:
        """From accept_loop, which took a slot for it: admit it and go on at once, or once its
        client speaks or stays silent for --sniff-timeout (see relay.net.waiting)."""
        connection = Connection(self, sock, peer[:2], self.config, self.pool)
        try:
            connection.admit()
        except Exception:
            # A bug must cost one connection, not the accept loop and every connection after it.
            log.exception("internal error while admitting %s", format_address(peer))
            connection.end_unless_ended(ends.ERROR)

    def reclaim(self) -> bool:
        """Every slot is taken and a client waits: end the connection idle longest among those whose
        client has not sent a byte since accept, so one host's silent connections cannot lock the
        others out. Whether one was found (its end gave back its slot)."""
        return self.pump.reclaim(ends.RECLAIMED)

    def original_destination(self, sock: socket.socket, mode: str) -> tuple[str, int]:
        if mode == "tproxy":
            return sock.getsockname()[:2]
        try:
            return fastpath.original_dst(sock)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return sock.getsockname()[:2]  # not NATed: the client connected to our port itself

    def refusal(self, config: Config, peer, dst):
        """(how it ends, why, which log limiter, its key) if this connection must be reset at once."""
        why = admission.loop_reason(
            peer,
            dst,
            own_sources=self.own_sources,
            proxy_addresses=self.pool.proxy_addresses(),
            listening=self.listening,
            is_local=self.is_local,
        )
        if why:
            return "refused:loop", why, self.warnings, f"loop {dst}"
        why = admission.destination_refusal(
            config, dst, refused_endpoints=self.refused_endpoints, is_local=self.is_local
        )
        if why:
            return "refused:destination", why, self.refusals, f"dst {dst}"
        why = admission.per_source_refusal(admission.per_source_cap(config, self.budget), peer[0], self.per_source)
        if why:
            return "refused:per-source-limit", why, self.warnings, f"source {peer[0]}"
        return None
