"""DNS servers on loopback for the resolver tests: UDP, TCP and DoH (HTTP/2 over TLS), each answering
the way a test asks: right, late, wrong, garbled or not at all."""

import ssl
from contextlib import asynccontextmanager

import dns.message
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from relay.config import Config
from relay.dns.framing import Framer, frame
from relay.dns.resolvers import make_resolver, make_resolvers
from relay.metrics import Metrics
from relay.net.dial import Dialer
from relay.net.upstreams import UpstreamPool

ANSWER_ADDRESS = "192.0.2.53"


@asynccontextmanager
async def resolving(values: dict, build):
    """``build(config, pool, dialer)`` for the Config of ``values``, its upstream pool and a running Dialer;
    closed at the end."""
    config = Config.from_values({"connect-timeout": 2, **values})
    pool = UpstreamPool(config, Metrics(version="t", fast_path="python"))
    await pool.resolve()
    dialer = Dialer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.run)
        resolver = build(config, pool, dialer)
        try:
            yield resolver
        finally:
            await resolver.aclose()
            dialer.close()


def resolver_for(url: str, ca_file=None, upstream: str = "direct"):
    """The resolver for ``url``, its tunnels opened through ``upstream``."""
    values = {"upstream": upstream, **({"dns-ca": str(ca_file)} if ca_file else {})}
    return resolving(values, lambda config, pool, dialer: make_resolver(url, pool=pool, dialer=dialer, config=config))


def split_resolvers_for(values: dict, resolv_conf: str):
    """make_resolvers for the settings ``values``, the default --dns-local read from ``resolv_conf``."""
    return resolving(
        values,
        lambda config, pool, dialer: make_resolvers(config, pool=pool, dialer=dialer, resolv_conf=resolv_conf),
    )


def answer_for(query_wire: bytes, address: str = ANSWER_ADDRESS, truncated: bool = False) -> bytes:
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    if truncated:
        response.flags |= dns.flags.TC
    elif question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", address))
    return response.to_wire()


class DnsServer:
    """UDP and TCP on one loopback port. ``udp_reply(query) -> list of datagrams`` and
    ``tcp_answer`` (False: read and say nothing; "reverse": answer each pair of queries in reverse
    order)."""

    def __init__(self):
        self.udp_reply = lambda query: [answer_for(query)]
        self.tcp_answer = True
        self.tcp_connections = 0
        self.tcp_queries: list[bytes] = []
        self.udp_queries: list[bytes] = []
        self.udp_sources: list[tuple] = []
        self.port = 0
        self._tcp_streams: list[trio.SocketStream] = []

    async def start(self, nursery) -> "DnsServer":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await self.udp.bind(("127.0.0.1", self.port))
        nursery.start_soon(self._serve_udp)
        nursery.start_soon(trio.serve_listeners, self._serve_tcp, listeners)
        return self

    async def _serve_udp(self) -> None:
        while True:
            query, peer = await self.udp.recvfrom(65535)
            self.udp_queries.append(query)
            self.udp_sources.append(peer)
            for datagram in self.udp_reply(query):
                await self.udp.sendto(datagram, peer)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        self.tcp_connections += 1
        self._tcp_streams.append(stream)
        framer, held = Framer(), []
        async for data in stream:
            for query in framer.receive_data(data):
                self.tcp_queries.append(query)
                if self.tcp_answer == "reverse":
                    held.append(query)
                    if len(held) == 2:
                        await stream.send_all(b"".join(frame(answer_for(q)) for q in reversed(held)))
                        held = []
                elif self.tcp_answer:
                    await stream.send_all(frame(answer_for(query)))

    def close_tcp_connections(self) -> None:
        for stream in self._tcp_streams:
            stream.socket.shutdown(trio.socket.SHUT_RDWR)
        self._tcp_streams = []


class DohServer:
    """An HTTP/2 DoH server over TLS (certificate for 127.0.0.1 by ``ca``). ``respond(request body)
    -> (status, content type, body)``, or None: no answer. ``goaway_after``: GOAWAY once that many
    requests came; ``reset``: RST_STREAM every request."""

    def __init__(self, ca, max_streams: int = 100):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.context.set_alpn_protocols(["h2"])
        self.max_streams = max_streams
        self.respond = lambda body: (200, "application/dns-message", answer_for(body))
        self.goaway_after: int | None = None
        self.reset = False
        self.connections = 0
        self.requests: list[tuple[dict, bytes]] = []
        self.most_open = 0  # the most requests open at once on a connection
        self.port = 0
        self.open: list[_Connection] = []

    async def start(self, nursery) -> "DohServer":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._serve, listeners)
        return self

    async def _serve(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        connection.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        connection.initiate_connection()
        state = _Connection(stream, connection)
        self.open.append(state)
        headers: dict[int, dict] = {}
        try:
            await state.flush()
            async with trio.open_nursery() as nursery:
                async for data in stream:
                    if state.frozen:
                        continue
                    for event in connection.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            headers[event.stream_id] = dict(event.headers)
                            state.bodies[event.stream_id] = b""
                        elif isinstance(event, h2.events.DataReceived):
                            connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                            state.bodies[event.stream_id] += event.data
                        elif isinstance(event, h2.events.StreamEnded):
                            self.requests.append((headers[event.stream_id], state.bodies[event.stream_id]))
                            self.most_open = max(self.most_open, len(state.bodies))
                            nursery.start_soon(self._answer, state, event.stream_id)
                        elif isinstance(event, h2.events.WindowUpdated):
                            state.window_opened.set()
                            state.window_opened = trio.Event()
                        elif isinstance(event, h2.events.StreamReset):
                            state.bodies.pop(event.stream_id, None)
                    await state.flush()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away

    def freeze_open_connections(self) -> None:
        """The connections open now go silent, PING included; new ones work."""
        for state in self.open:
            state.frozen = True

    async def _answer(self, state: "_Connection", stream_id: int) -> None:
        await trio.sleep(0.01)  # so that requests overlap
        connection = state.connection
        body = state.bodies.pop(stream_id, None)
        if body is None:
            return  # reset by the client
        if self.goaway_after is not None and len(self.requests) >= self.goaway_after:
            connection.close_connection(last_stream_id=0)
        elif self.reset:
            connection.reset_stream(stream_id)
        else:
            reply = self.respond(body)
            if reply is None:
                return
            status, content_type, payload = reply
            connection.send_headers(stream_id, [(":status", str(status)), ("content-type", content_type)])
            while True:
                size = min(
                    len(payload), connection.local_flow_control_window(stream_id), connection.max_outbound_frame_size
                )
                if size == 0 and payload:
                    await state.flush()
                    await state.window_opened.wait()
                    continue
                chunk, payload = payload[:size], payload[size:]
                connection.send_data(stream_id, chunk, end_stream=not payload)
                if not payload:
                    break
        await state.flush()


class _Connection:
    def __init__(self, stream, connection):
        self.stream, self.connection = stream, connection
        self.bodies: dict[int, bytes] = {}  # requests not answered yet
        self.frozen = False  # reads and drops everything, as a path that died silently would
        self.window_opened = trio.Event()
        self.lock = trio.Lock()

    async def flush(self) -> None:
        async with self.lock:
            data = self.connection.data_to_send()
            if data:
                await self.stream.send_all(data)
