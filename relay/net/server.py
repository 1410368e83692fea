"""The relay process's serving side: listeners, the shared machinery, reloads and draining.

Each connection is a relay.net.connection.Connection; this module starts what
carries them all (the dialer, the waiting room, the pump, health checks, ssh
tunnels), accepts until told to stop, applies SIGHUP reloads to new
connections, and drains on SIGTERM.
"""

import signal
import socket

import trio

from relay import fastpath, systemd
from relay.addresses import format_address
from relay.config import Config, ConfigError
from relay.dns import fakeip, fakeip_store
from relay.dns.names import NameBook
from relay.dns.resolvers import Tunnels, make_resolvers
from relay.dns.service import DnsService, allowed_networks
from relay.logs import log
from relay.net.connections import Connections
from relay.net.dial import Dialer, apply_mark
from relay.net.listener import accept_loop, open_listeners
from relay.net.preconnect import Preconnector
from relay.net.tunnel import make_tunnels
from relay.net.upstreams import UpstreamPool
from relay.udp.service import UdpService

# Settings a reload cannot change on a running process (they shape sockets, processes or privileges).
RESTART_ONLY = (
    "mode", "listen", "workers", "user", "metrics", "ssh", "ssh_identity", "ssh_option", "ssh_connections",
    "ssh_session", "log_format", "dns", "dns_upstream", "dns_local", "dns_ca", "dns_min_ttl", "dns_max_ttl",
    "dns_cache_size", "dns_mode", "fake_ip_range", "state_dir", "udp", "udp_max_sessions", "udp_max_per_source",
    "udp_idle_timeout",
)  # fmt: skip


class Server:
    def __init__(self, config: Config, metrics, reload=None):
        self.config = config
        self.metrics = metrics
        self.reload = reload  # returns a fresh Config (file re-read, command line re-applied), or raises ConfigError
        self.listeners: list[socket.socket] = []
        self.dialer = Dialer(Preconnector(config.preconnect, config.connect_timeout, metrics))
        self.pool = UpstreamPool(config, metrics, self.dialer)
        self.tunnels = []
        self.names = NameBook()  # what the DNS service answered whom: connections are opened by those names
        self.connections = Connections(config, metrics, self.pool, self.dialer, self.names)
        self.dns: DnsService | None = None
        # In fake-ip mode, the names behind the fake addresses; connections to them are opened by name.
        self.fake_ips = self.connections.fake_ips = metrics.fake_ips = fakeip.for_config(config)
        if config.dns:
            # One set of tunnels for every DNS upstream, so a reload can point them at the new pool.
            self.dns_tunnels = Tunnels(self.pool, self.dialer, config)
            resolvers = make_resolvers(config, pool=self.pool, dialer=self.dialer, tunnels=self.dns_tunnels)
            self.dns = DnsService(config, resolvers, metrics, self.names, fake_ips=self.fake_ips)
        self.udp = UdpService(config, metrics, self.dialer) if config.udp_upstreams else None

    async def open(self) -> None:
        """Bind the listeners and check capabilities; raises ConfigError with a user-facing message."""
        config = self.config
        if config.mark is not None:
            with socket.socket() as probe:
                try:
                    apply_mark(probe, config.mark)
                except PermissionError:
                    raise ConfigError("--mark needs CAP_NET_ADMIN (run as root, or grant the capability)") from None
        if config.ssh:
            self.tunnels = make_tunnels(config, self.metrics)
            target = self.tunnels[0].target if self.tunnels else None
            if target is not None:
                infos = await trio.socket.getaddrinfo(target.host, target.port or 22, type=socket.SOCK_STREAM)
                self.connections.refused_endpoints = {info[4][:2] for info in infos}
        else:
            await self.pool.resolve()
        self.listeners = await open_listeners(
            config.listen, transparent=config.mode == "tproxy", reuse_port=config.workers > 1
        )
        self.connections.listening = {sock.getsockname()[:2] for sock in self.listeners}
        if self.fake_ips is not None:
            fakeip_store.prepare(config.state_dir, config.user)
            fakeip_store.load(self.fake_ips, config.state_dir)
        if self.dns is not None:
            self.dns.open()
        if self.udp is not None:
            self.udp.open()

    async def serve(self, signals) -> None:
        """Accept and relay until SIGINT/SIGTERM arrives on ``signals``, then drain; SIGHUP reloads."""
        async with trio.open_nursery() as services:
            for tunnel in self.tunnels:
                await services.start(tunnel.run)
            if self.tunnels:
                await self.pool.resolve(self.tunnels)
            health = await services.start(self.run_health_checks, self.pool)
            if self.dns is not None:
                await services.start(self.dns.serve)
            if self.udp is not None:
                await services.start(self.udp.serve)
            if self.fake_ips is not None:  # cancelled with the other services at exit: it writes the store then
                services.start_soon(fakeip_store.keep_saved, self.fake_ips, self.config.state_dir)
            connections = self.connections
            services.start_soon(connections.pump.run)
            services.start_soon(self.dialer.run)
            services.start_soon(self.dialer.preconnect.run)
            services.start_soon(connections.waiting.run)
            async with trio.open_nursery() as connections.tasks:
                accepting = trio.CancelScope()
                try:
                    await self.serve_until_stopped(services, signals, health, accepting)
                finally:
                    accepting.cancel()  # accept loops call connections.accepted() no more
                    connections.waiting.close()  # nothing starts a task after this
                    connections.tasks.cancel_scope.cancel()  # what is left is reset
            self.dialer.close()  # reset the connections still being opened
            connections.pump.close()  # handshakes are over: reset the relayed connections left
            if self.dns is not None:
                with trio.move_on_after(1):  # say goodbye to DoH servers, but do not wait on a dead tunnel
                    await self.dns.resolvers.aclose()
            services.cancel_scope.cancel()

    async def serve_until_stopped(self, services, signals, health, accepting: trio.CancelScope) -> None:
        services.start_soon(self.accept_all, accepting)
        log.info(
            "listening on %s (%s), upstream %s, fast path: %s",
            ", ".join(format_address(a) for a in sorted(self.connections.listening)),
            self.config.mode,
            ", ".join(str(u) for u in self.config.upstreams),
            fastpath.WHY,
        )
        if self.dns is not None:
            log.info(
                "DNS on %s (UDP and TCP, %s mode), resolved through %s",
                ", ".join(format_address(a) for a in self.dns.addresses),
                self.config.dns_mode,
                " then ".join(str(u) for u in self.config.dns_upstream),
            )
        if self.udp is not None:
            log.info("UDP (TPROXY) on the same addresses, through SOCKS5 UDP ASSOCIATE at %s", self.udp.upstream)
        systemd.notify("READY=1")
        async for signum in signals:
            if signum == signal.SIGHUP:
                health = await self.apply_reload(services, health)
                continue
            log.info(
                "%s: not accepting; draining %d connections for up to %g s",
                signal.Signals(signum).name,
                len(self.connections),
                self.config.drain_time,
            )
            systemd.notify("STOPPING=1")
            accepting.cancel()
            with trio.move_on_after(self.config.drain_time):
                while len(self.connections):
                    await trio.sleep(0.05)
            return

    async def accept_all(self, accepting: trio.CancelScope) -> None:
        try:
            with accepting:
                async with trio.open_nursery() as nursery:
                    for listener in self.listeners:
                        connections = self.connections
                        nursery.start_soon(
                            accept_loop,
                            listener,
                            connections.accepted,
                            connections.warnings,
                            connections.slots,
                            connections.reclaim,
                        )
        finally:
            for listener in self.listeners:  # closed only once no task waits on them
                listener.close()

    async def run_health_checks(self, pool: UpstreamPool, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await pool.run_health_checks()

    async def apply_reload(self, services, health: trio.CancelScope) -> trio.CancelScope:
        """SIGHUP: a new configuration for new connections; open ones keep theirs."""
        systemd.notify("RELOADING=1")
        try:
            new = self.reload()
            pool = UpstreamPool(new, self.metrics, self.dialer)
            if not new.ssh:
                await pool.resolve()
            else:
                await pool.resolve(self.tunnels)
            dns_allow = allowed_networks(new) if self.dns is not None else None
        except ConfigError as exc:
            log.warning("SIGHUP: keeping the old configuration: %s", exc)
            systemd.notify("READY=1")
            return health
        ignored = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        for key in ignored:
            setattr(new, key, getattr(self.config, key))
        if ignored:
            log.warning("SIGHUP: %s only change on restart", ", ".join(k.replace("_", "-") for k in ignored))
        health.cancel()
        self.config, self.pool = new, pool
        self.connections.config, self.connections.pool = new, pool
        self.dialer.preconnect.configure(new.preconnect, new.connect_timeout, new.upstreams)
        if self.dns is not None:
            self.dns.config = self.dns.resolvers.config = new
            self.dns.allow = dns_allow
            self.dns_tunnels.pool, self.dns_tunnels.config = pool, new
        if self.fake_ips is not None:
            self.fake_ips.excluded = fakeip.excluded_suffixes(new)
        self.connections.own_names.load()
        log.info("SIGHUP: configuration reloaded; upstream %s", ", ".join(str(u) for u in new.upstreams))
        systemd.notify("READY=1")
        return await services.start(self.run_health_checks, pool)
