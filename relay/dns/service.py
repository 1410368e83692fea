"""The DNS service: UDP and TCP on each --dns address, answered from the cache or through the tunnel.

Only clients in --dns-allow are answered; anyone else gets REFUSED, so the
router is never an open resolver. Everything a client can make it hold is
bounded: queries per second per source, questions in flight and clients
waiting on them, TCP connections, queries in flight per TCP connection, and
TCP idle time (RFC 7766). Identical questions asked at once go upstream once.
"""

import contextlib
import ipaddress
import json
import logging
import socket
import struct
import subprocess
import time

import dns.rdataclass
import dns.rdatatype
import trio

from relay import fastpath
from relay.addresses import format_address, plain_address
from relay.config import DNS_ALLOW_DEFAULT, Config, ConfigError
from relay.dns import message
from relay.dns.cache import Cache
from relay.dns.framing import FrameError, Framer, frame
from relay.dns.resolvers import ResolverError
from relay.dns.wire import peek_query, plain_wire_name
from relay.logs import RateLimited, conn_log, log
from relay.net.sockets import family_of

UDP_RECEIVE_SIZE = 4096  # a query is far smaller; more is not a query
UDP_BATCH = 64  # datagrams answered in a row before other tasks get a turn
HITS_KEPT = 65536  # at most this many of the cache's answers are given by the fast path (relay.fastpath.DnsHits)
MAX_IN_FLIGHT = 1024  # distinct questions being resolved upstream at once, all clients together
MAX_WAITING = 4096  # client queries waiting for an upstream answer, all clients together
MAX_TCP_CONNECTIONS = 256
MAX_TCP_PIPELINE = 32  # queries in flight on one TCP connection
TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 6.2.3: seconds, not minutes
# Clients outside --dns-allow get REFUSED over TCP too, on connections of their own: this many at once, each
# closed this long after it opened, whatever it sends. None of them takes one of the LAN's slots.
STRANGER_TCP_CONNECTIONS = 16
STRANGER_TCP_TIMEOUT = 2.0
TCP_WRITE_TIMEOUT = 10.0
TCP_RECEIVE_SIZE = 65536
TCP_BACKLOG = 128
PORT_TRIES = 20  # with port 0, for a port free for TCP as well as UDP
ANSWER_GRACE = 1.0  # beyond --dns-timeout, before a resolver that overran it is abandoned
# Per client address: a burst of this many queries, refilled at this rate per second.
SOURCE_BURST = 200
SOURCE_RATE = 100.0
SOURCES_KEPT = 4096
REFRESHED = ("NOERROR", "NXDOMAIN")  # upstream answers that replace a stale one


class SourceRates:
    """A token bucket per client address; bounded (when full, buckets that have refilled are forgotten)."""

    def __init__(self, burst: int = SOURCE_BURST, rate: float = SOURCE_RATE, kept: int = SOURCES_KEPT, clock=None):
        self.burst, self.rate, self.kept = burst, rate, kept
        self.clock = clock or time.monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def allow(self, source: str) -> bool:
        now = self.clock()
        tokens, when = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        if source not in self._buckets and len(self._buckets) >= self.kept:
            self._forget_refilled(now)
        self._buckets[source] = (tokens - 1, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_refilled(self, now: float) -> None:
        full = [key for key, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.rate >= self.burst]
        # None refilled: a flood from many sources; forget the older half rather than grow.
        for key in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[key]


class Question:
    """One question on its way upstream; whoever asks it meanwhile waits for the same answer."""

    def __init__(self):
        self.done = trio.Event()
        self.response: bytes | None = None  # None once done: every upstream failed


class DnsService:
    """Answers DNS queries on every --dns address (see the module's docstring).

    ``resolvers`` has ``await resolve(key, timeout) -> bytes`` (relay.dns.resolvers); ``names`` (a
    relay.dns.names.NameBook) learns every reply a client gets, so connections can learn the names behind
    addresses. ``fake_ips`` (relay.dns.fakeip) answers what it takes in fake-ip mode; None in real mode.
    """

    def __init__(self, config: Config, resolvers, metrics, names=None, cache: Cache | None = None, fake_ips=None):
        self.config, self.resolvers, self.metrics = config, resolvers, metrics
        self.names = names
        self.fake_ips = fake_ips
        if cache is None:
            cache = Cache(config.dns_cache_size, config.dns_min_ttl, config.dns_max_ttl)
        self.cache = cache
        # Cache hits on IPv4 addresses answered without a call into Python per query (serve_udp_hits), with
        # room for every answer of the cache twice (asked with EDNS and without), so that it never fills. What
        # it may answer depends on the configuration, the allowed networks and the fake-ip exclusions: it is
        # emptied when any of them is replaced (a reload).
        self.hits = fastpath.DnsHits(2 * min(cache.max_entries, HITS_KEPT)) if cache.max_entries > 0 else None
        self._hits_for: tuple = ()
        if self.hits is not None:
            cache.dropped = self._forget_hit
            if names is not None:
                names.displaced = self._untell
        self.rates = SourceRates()
        self.questions: dict[message.Key, Question] = {}
        self.waiting = 0
        self.tcp_slots = trio.Semaphore(MAX_TCP_CONNECTIONS)
        self.stranger_slots = trio.Semaphore(STRANGER_TCP_CONNECTIONS)
        self.warnings = RateLimited()
        self.sockets: list[socket.socket] = []
        self._nursery: trio.Nursery | None = None
        self.allow: list = []  # the networks answered (allowed_networks), set by open()
        self._allowed: dict[str, bool] = {}  # by client address, for the networks in self._allowed_by
        self._allowed_by = self.allow

    def open(self) -> None:
        """Bind every --dns address, UDP and TCP; ConfigError with what stands in the way."""
        self.allow = allowed_networks(self.config)
        try:
            for host, port in self.config.dns:
                self.sockets.extend(_bound_pair(host, port))
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens (ports chosen by the kernel filled in), one entry per address."""
        return [sock.getsockname()[:2] for sock in self.sockets if sock.type == socket.SOCK_DGRAM]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sock in self.sockets:
                    serve = self.serve_udp if sock.type == socket.SOCK_DGRAM else self.serve_tcp
                    nursery.start_soon(serve, sock)
                task_status.started()
        finally:
            self.close()

    def allowed(self, host: str) -> bool:
        if self._allowed_by is not self.allow:  # reloaded
            self._allowed, self._allowed_by = {}, self.allow
        allowed = self._allowed.get(host)
        if allowed is None:
            text, _, scope = host.partition("%")
            address = plain_address(text)
            allowed = any(address in network for network in self.allow) and self._on_the_lan(address, scope)
            if len(self._allowed) >= SOURCES_KEPT:
                self._allowed.clear()
            self._allowed[host] = allowed
        return allowed

    def _on_the_lan(self, address, scope: str) -> bool:
        """A link-local address is on every link: with --lan-iface, one counts only on those interfaces (a
        neighbour on the WAN link has fe80::/64 too)."""
        if not (scope and address.is_link_local and self.config.lan_iface):
            return True
        with contextlib.suppress(ValueError, OSError):
            scope = socket.if_indextoname(int(scope))  # a scope given by number
        return scope in self.config.lan_iface

    # -- UDP ---------------------------------------------------------------------------------------

    async def serve_udp(self, sock: socket.socket) -> None:
        """Datagrams are read and answered without a wait while they keep coming (a cache hit costs no
        scheduling), up to UDP_BATCH in a row before other tasks get a turn."""
        if self.hits is not None and sock.family == socket.AF_INET and not _is_wildcard(sock):
            await self.serve_udp_hits(sock)
            return
        receive = _receive_with_destination if _is_wildcard(sock) else _receive
        while True:
            for _ in range(UDP_BATCH):
                try:
                    wire, peer, source = receive(sock)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    break
                except OSError as exc:
                    self.receive_failed(exc)
                    continue
                if (waiting := self.answer_datagram(sock, wire, peer, source)) is not None:
                    await self.send_udp(sock, waiting, peer, source)
            else:
                await trio.lowlevel.checkpoint()

    async def serve_udp_hits(self, sock: socket.socket) -> None:
        """serve_udp with cache hits answered by self.hits, UDP_BATCH datagrams at a time: what it leaves
        (misses, queries of other shapes, clients it may not answer) is answered here as serve_udp would."""
        fd = sock.fileno()
        while True:
            self._check_hits()
            try:
                received, left, unsent, told, counts = self.hits.answer(fd, self.cache.now(), UDP_BATCH)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                self.receive_failed(exc)
                await trio.lowlevel.checkpoint()
                continue
            for qtype, count in counts.items():
                self.metrics.dns_query(message.type_label(qtype), "cache", count)
            if told:
                self._told(told)
            for reply, peer in unsent:
                await self.send_udp(sock, reply, peer, None)
            for wire, peer in left:
                if (waiting := self.answer_datagram(sock, wire, peer, None, fast=True)) is not None:
                    await self.send_udp(sock, waiting, peer, None)
            if received < UDP_BATCH:
                await trio.lowlevel.wait_readable(sock)  # at once if more came meanwhile
            else:
                await trio.lowlevel.checkpoint()

    def receive_failed(self, exc: OSError) -> None:
        """An ICMP error for an earlier reply, reported by a receive: not the socket's fault, told and ignored."""
        self.warnings.warning(f"dns-receive-{exc.errno}", f"DNS receive failed: {exc}")

    def answer_datagram(self, sock: socket.socket, wire: bytes, peer, source, fast: bool = False) -> bytes | None:
        """Answer a query that came over UDP, or start resolving it: the reply that waits for room in the
        socket, if any (answer_now for ``fast``)."""
        reply = self.answer_now(wire, peer[0], True, fast)
        if isinstance(reply, message.Query):
            self._nursery.start_soon(self.resolve_for_udp, sock, reply, peer, source)
        elif reply is not None and not self.sent_udp(sock, reply, peer, source):
            return reply
        return None

    def _check_hits(self) -> None:
        """Empty self.hits if what decides its answers was replaced (a reload), and give it the allowed networks."""
        deciding = (self.config, self.allow, self.fake_ips.excluded if self.fake_ips is not None else None)
        if len(self._hits_for) == 3 and all(now is then for now, then in zip(deciding, self._hits_for)):
            return
        self.hits.clear()
        self.hits.allow([(net.network_address.packed, net.prefixlen) for net in self.allow if net.version == 4])
        self._hits_for = deciding

    def _install_hit(self, peek, template) -> None:
        """Let self.hits answer ``peek``'s question from now on, while the cache's answer is fresh."""
        times = self.cache.times(peek.key)
        if times is not None:
            self.hits.put(peek.qname.lower(), peek.key[1], peek.key[2], peek.edns, template.wire,
                          template.ttl_offsets, template.ttls, *times, (peek.key, peek.edns),
                          self.cache.now())  # fmt: skip

    def _forget_hit(self, key: message.Key) -> None:
        qname = plain_wire_name(key[0])
        if qname is not None:
            self.hits.forget(qname, key[1], key[2])

    def _untell(self, client: str, name: str, address: str) -> None:
        """The name book now gives ``client`` another name for ``address`` than ``name``: should ``name``'s
        answer be given to that client again, self.hits must tell it, so that the last answer given wins."""
        qname = plain_wire_name(name + ".")
        if qname is not None:
            qtype = dns.rdatatype.A if ":" not in address else dns.rdatatype.AAAA
            self.hits.untell(client, qname, qtype, dns.rdataclass.IN)

    def _told(self, told: list) -> None:
        """Clients self.hits answered, normally once per RETELL_AFTER (relay/_fastpath.pyx) per answer: what the
        hot path would have learnt from each, the cache's recency and the name book, learnt now."""
        now = trio.current_time()
        for client, (key, edns) in told:
            hit = self.cache.template(key, edns)
            if hit is not None and self.names is not None:
                self.names.learn_template(client, *hit, now)

    async def resolve_for_udp(self, sock: socket.socket, query: message.Query, peer, source) -> None:
        reply = await self.resolve(query, peer[0])
        await self.send_udp(sock, message.truncated_for_udp(reply, query.udp_limit), peer, source)

    async def send_udp(self, sock: socket.socket, reply: bytes, peer, source) -> None:
        """``source``: None, or the control message that sends from the address the client asked."""
        while not self.sent_udp(sock, reply, peer, source):
            await trio.lowlevel.wait_writable(sock)

    def sent_udp(self, sock: socket.socket, reply: bytes, peer, source) -> bool:
        """Try once; False if the socket's buffer is full (an error is logged and counts as sent)."""
        if not reply:
            return True  # an upstream answer too large and unparsable: the client will retry over TCP or elsewhere
        try:
            if source is not None:
                sock.sendmsg([reply], [source], 0, peer)
            else:
                sock.sendto(reply, peer)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.warnings.warning(f"dns-send-{exc.errno}", f"DNS reply to {format_address(peer)} failed: {exc}")
        return True

    # -- TCP ---------------------------------------------------------------------------------------

    async def serve_tcp(self, sock: socket.socket) -> None:
        listener = trio.socket.from_stdlib_socket(sock)
        while True:
            await self.tcp_slots.acquire()
            try:
                conn, peer = await listener.accept()
            except OSError as exc:
                self.tcp_slots.release()
                self.warnings.warning(f"dns-accept-{exc.errno}", f"DNS accept() failed: {exc}")
                await trio.sleep(0.1)  # out of fds: wait rather than spin
                continue
            except BaseException:
                self.tcp_slots.release()
                raise
            slots = self.tcp_slots
            if not self.allowed(peer[0]):
                self.tcp_slots.release()
                try:
                    self.stranger_slots.acquire_nowait()
                except trio.WouldBlock:
                    conn.close()
                    continue
                slots = self.stranger_slots
            self._nursery.start_soon(self.converse, conn, peer, slots)

    async def converse(self, conn, peer, slots: trio.Semaphore) -> None:
        """One TCP client: queries in, each answer out when ready (so out of order), until the client closes,
        sends no whole query for TCP_IDLE_TIMEOUT (bytes trickled into one count for nothing), or sends what
        cannot be DNS; answers owed are sent before the close. A stranger (``slots``: theirs) is answered
        REFUSED and closed STRANGER_TCP_TIMEOUT after it came, whatever it sends."""
        stream = trio.SocketStream(conn)
        framer, writing, pipeline = Framer(), trio.Lock(), trio.Semaphore(MAX_TCP_PIPELINE)
        stranger = slots is self.stranger_slots
        idle_at = trio.current_time() + (STRANGER_TCP_TIMEOUT if stranger else TCP_IDLE_TIMEOUT)
        try:
            async with trio.open_nursery() as answers:
                while True:
                    # Caught here, not around the nursery, which would wrap it in an ExceptionGroup: a
                    # reset would then escape to serve() and end the service and the relay with it.
                    try:
                        with trio.move_on_at(idle_at) as idle:
                            data = await stream.receive_some(TCP_RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break  # reset by the client: the answers owed fail the same way
                    if idle.cancelled_caught or not data:
                        break
                    try:
                        wires = framer.receive_data(data)
                    except FrameError:
                        break
                    if wires and not stranger:
                        idle_at = trio.current_time() + TCP_IDLE_TIMEOUT
                    for wire in wires:
                        await pipeline.acquire()  # no reading while MAX_TCP_PIPELINE are unanswered
                        answers.start_soon(self.answer_tcp, stream, wire, peer[0], writing, pipeline)
        finally:
            conn.close()
            slots.release()

    async def answer_tcp(self, stream, wire: bytes, client: str, writing: trio.Lock, pipeline: trio.Semaphore) -> None:
        try:
            reply = self.answer_now(wire, client, over_udp=False)
            if isinstance(reply, message.Query):
                reply = await self.resolve(reply, client)
            if reply is not None:
                async with writing:
                    with trio.move_on_after(TCP_WRITE_TIMEOUT) as stalled:
                        await stream.send_all(frame(reply))
                    if stalled.cancelled_caught:
                        # Part of the frame may be out: whatever followed would be read as garbage. Closing
                        # ends the reading loop and fails the answers still owed.
                        await trio.aclose_forcefully(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            pipeline.release()

    # -- answering ---------------------------------------------------------------------------------

    def answer_now(self, wire: bytes, client: str, over_udp: bool, fast: bool = False):
        """The reply to send at once (bytes), None to send nothing, or the Query to resolve upstream. ``fast``:
        ``wire`` came through self.hits, which a cache hit here is then given to."""
        hit = self.cache_hit(wire, client, over_udp, fast)
        if hit is not None:
            return hit
        try:
            query = message.parse_query(wire)
        except message.BadQuery as exc:
            self.metrics.dns_query("-", "formerr" if exc.reply else "dropped")
            return exc.reply if self.allowed(client) else None  # strangers get no reply to amplify with
        qtype = message.type_label(query.key[1])
        if not self.allowed(client):
            self.metrics.dns_query(qtype, "refused")
            return message.refused(query)
        if self.withholds(query.key):
            self.metrics.dns_query(qtype, "no-data")
            return message.no_data(query)
        if self.fake_ips is not None:
            # The pool's own answer: not for `answered`, it maps addresses itself. A new name takes an address
            # another may still be using: limited as a question upstream is.
            faked = self.fake_ips.answer(query, lambda: self.rates.allow(client))
            if faked is not None:
                outcome, reply = faked
                self.metrics.dns_query(qtype, outcome)
                return reply  # one record at most: always fits 512 bytes (None: a flood gets nothing)
        cached = self.cache.get(query.key)
        if cached is not None and cached[1]:
            self.metrics.dns_query(qtype, "cache")
            reply = self.told(client, message.reply_for(query, cached[0]))
            return message.truncated_for_udp(reply, query.udp_limit) if over_udp else reply
        # Only what costs an upstream question is limited: answers from the cache cost less than telling apart
        # a flood from a busy client would.
        if not self.rates.allow(client):
            self.metrics.dns_query(qtype, "dropped")
            return None  # a flood gets nothing, not even an error to count on
        if self.waiting >= MAX_WAITING or (query.key not in self.questions and len(self.questions) >= MAX_IN_FLIGHT):
            self.metrics.dns_query(qtype, "servfail")
            return message.servfail(query)
        return query

    async def resolve(self, query: message.Query, client: str) -> bytes:
        """The reply to ``query`` from upstream (a question asked once however many ask it at once),
        a stale cached answer if every upstream failed (RFC 8767), or SERVFAIL."""
        key = query.key
        question = self.questions.get(key)
        self.waiting += 1
        try:
            if question is None:
                question = self.questions[key] = Question()
                try:
                    question.response = await self.ask_upstream(key, client)
                finally:
                    del self.questions[key]
                    question.done.set()
            else:
                await question.done.wait()
        finally:
            self.waiting -= 1
        qtype = message.type_label(key[1])
        response = question.response
        # RFC 8767 4: an answer with any other rcode (SERVFAIL, REFUSED: the resolver is up but cannot
        # resolve) is a failure to refresh, as a timeout is: a stale answer is better.
        if response is None or message.rcode_text(response) not in REFRESHED:
            stale = self.cache.get(key)
            if stale is not None:
                self.metrics.dns_query(qtype, "stale")
                return self.told(client, message.reply_for(query, stale[0]))
        if response is not None:
            self.metrics.dns_query(qtype, "upstream")
            return self.told(client, message.reply_for(query, response), response)
        self.metrics.dns_query(qtype, "servfail")
        return message.servfail(query)

    def told(self, client: str, reply: bytes, response: bytes | None = None) -> bytes:
        """``reply`` after the name book learnt it; from ``response``, the upstream answer it re-addresses, when
        given and not replaced by an error: that one has been read already (message.read_response)."""
        if self.names is not None:
            same = response is not None and len(reply) >= 4 and reply[3] & 0x0F == response[3] & 0x0F
            self.names.learn(client, response if same else reply, trio.current_time())
        return reply

    def withholds(self, key: message.Key) -> bool:
        """Whether ``key`` is answered with no data whatever upstream says: AAAA with --dns-aaaa off."""
        return key[1] == dns.rdatatype.AAAA and not self.config.dns_aaaa

    def cache_hit(self, wire: bytes, client: str, over_udp: bool, fast: bool = False) -> bytes | None:
        """The hot path: the reply to a query of the usual shape (relay.dns.wire.peek_query) with a fresh answer in the
        cache, patched from its template without dnspython; None for everything else, which answer_now parses
        and judges in full. What it answers, it answers as answer_now would (tested)."""
        peek = peek_query(wire)
        if peek is None or (self.fake_ips is not None and self.fake_ips.takes(peek.key)):
            return None
        if self.withholds(peek.key) or not self.allowed(client):
            return None
        hit = self.cache.hit(peek)
        if hit is None:
            return None
        template, ttl_of = hit
        if over_udp and len(template.wire) > peek.udp_limit:
            return None  # truncated by the slow path
        self.metrics.dns_query(message.type_label(peek.key[1]), "cache")
        if self.names is not None:
            self.names.learn_template(client, template, ttl_of, trio.current_time())
        if fast:
            self._install_hit(peek, template)
        return template.render(peek, ttl_of)

    async def ask_upstream(self, key: message.Key, client: str) -> bytes | None:
        started = time.monotonic()
        response = None
        try:
            # The resolvers keep to the timeout; this makes sure, since clients wait on it. (A plain cancel scope:
            # fail_after's generator costs a few per cent of a miss.)
            with trio.move_on_after(self.config.dns_timeout + ANSWER_GRACE):
                response = await self.resolvers.resolve(key, self.config.dns_timeout)
            if response is None:
                return self.failed(key, client, started, ResolverError("no DNS upstream answered in time", "timeout"))
        except ResolverError as exc:
            return self.failed(key, client, started, exc)
        except Exception:  # a bug costs one question, not the service
            log.exception("internal error while resolving a DNS question")
            return None
        self.metrics.dns_upstream_answered(time.monotonic() - started)
        self.cache.put(key, response)
        self.log_question(key, client, started, message.rcode_text(response))
        return response

    def failed(self, key: message.Key, client: str, started: float, exc: ResolverError) -> None:
        self.metrics.dns_upstream_failed(exc.reason)
        self.warnings.warning(f"dns-{exc.reason}", f"DNS upstreams failed: {exc}")
        self.log_question(key, client, started, f"failed:{exc.reason}")

    def log_question(self, key: message.Key, client: str, started: float, outcome: str) -> None:
        """One line per question that went upstream, with -v only: it says what a client looked up."""
        if conn_log.isEnabledFor(logging.INFO):
            conn_log.info(
                "dns client=%s name=%s type=%s time=%.3fs result=%s",
                client,
                key[0],
                dns.rdatatype.to_text(key[1]),
                time.monotonic() - started,
                outcome,
            )


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def allowed_networks(config: Config) -> list:
    """The clients the service answers: --dns-allow; by default the networks of every --lan-iface (and the
    router's own loopback), or without --lan-iface the private, loopback and link-local ranges. ConfigError
    if a --lan-iface cannot be read."""
    if config.dns_allow:
        return list(config.dns_allow)
    if not config.lan_iface:
        return [ipaddress.ip_network(text) for text in DNS_ALLOW_DEFAULT]
    networks = list(LOOPBACK)
    for iface in config.lan_iface:
        found = interface_networks(_ip_addr_json(iface))
        if not found:
            log.warning("--lan-iface %s has no address: the DNS service answers none of its clients", iface)
        networks += found
    return networks


def interface_networks(ip_json: str) -> list:
    """The networks of the addresses in ``ip -json addr show`` output (IPv4 and IPv6, link-local included)."""
    networks = []
    for link in json.loads(ip_json):
        for address in link.get("addr_info", ()):
            try:
                network = ipaddress.ip_interface(f"{address['local']}/{address['prefixlen']}").network
            except (KeyError, ValueError):
                continue
            if network not in networks:
                networks.append(network)
    return networks


def _ip_addr_json(iface: str) -> str:
    try:
        done = subprocess.run(["ip", "-json", "addr", "show", "dev", iface], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"--lan-iface {iface}: cannot read its addresses for --dns-allow: {exc}") from None
    if done.returncode != 0:
        reason = done.stderr.strip() or f"ip exited with status {done.returncode}"
        raise ConfigError(f"--lan-iface {iface}: cannot read its addresses for --dns-allow: {reason}")
    return done.stdout


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python 3.11 does not name it
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, the source to send from, the header's destination
_CMSG_SPACE = socket.CMSG_SPACE(max(_IN_PKTINFO.size, 20))  # in6_pktinfo: 16-byte address, ifindex


def _is_wildcard(sock: socket.socket) -> bool:
    return sock.getsockname()[0] in ("0.0.0.0", "::")


def _receive(sock: socket.socket) -> tuple[bytes, tuple, None]:
    return *sock.recvfrom(UDP_RECEIVE_SIZE), None


def _receive_with_destination(sock: socket.socket) -> tuple[bytes, tuple, tuple | None]:
    """As _receive, for a socket bound to 0.0.0.0 or ::, where the kernel would choose a reply's source by
    the route back, not by the address asked: on a router with several, the client would drop the reply."""
    wire, ancillary, _, address = sock.recvmsg(UDP_RECEIVE_SIZE, _CMSG_SPACE)
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, _, destination = _IN_PKTINFO.unpack_from(data)
            return wire, address, (level, kind, _IN_PKTINFO.pack(0, destination, bytes(4)))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return wire, address, (level, kind, data)  # the address asked, and its interface
    return wire, address, None


def _bound_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets bound to ``host``:``port``; port 0: one free port for both."""
    for _ in range(PORT_TRIES):
        udp = _bound(host, port, socket.SOCK_DGRAM)
        try:
            return udp, _bound(host, udp.getsockname()[1], socket.SOCK_STREAM)
        except ConfigError:
            udp.close()
            if port != 0:
                raise
    raise ConfigError(f"no port free for both UDP and TCP on {host}")


def _bound(host: str, port: int, kind: int) -> socket.socket:
    family = family_of(host)
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0 gets its own socket
        sock.bind((host, port))
        sock.setblocking(False)
        if kind == socket.SOCK_DGRAM and _is_wildcard(sock):
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
    except PermissionError:
        sock.close()
        raise ConfigError(
            f"--dns {format_address((host, port))}: a port below 1024 needs root or CAP_NET_BIND_SERVICE"
        ) from None
    except OSError as exc:
        sock.close()
        protocol = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        raise ConfigError(f"cannot serve DNS on {format_address((host, port))} ({protocol}): {exc.strerror}") from None
    return sock
