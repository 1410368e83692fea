"""relay.rules in the lab: rules applied on the router send traffic through the relay, and
remove() puts the router's firewall and routing back exactly as they were."""

import contextlib
import os
import re
import socket
import ssl
import sys
import threading
import time

import pytest

from relay.lab import ADDR, LabCommandError
from relay.lab.servers import HttpServer, TrafficServer, pattern_sha256
from relay.rules import BACKENDS, DEFAULT_ROUTE_TABLE, MODES, RuleSettings
from tests.e2e.clients import connect, download, expect_reset, read_all
from tests.e2e.conftest import RELAY_PORT, TRAFFIC_PORT, UPSTREAMS
from tests.e2e.dns_responder import DnsResponder

MARK = 0x10
FAR_ECHO_PORT = 7610
INBOUND_PORT = 7611
SIZE = 256 << 10
STATE_COMMANDS = (
    ["iptables-save"],
    ["ip6tables-save"],
    ["nft", "list", "ruleset"],
    ["ip", "-4", "rule"],
    ["ip", "-6", "rule"],
    # Only our table: the kernel adds link-local routes of its own while the lab settles.
    ["ip", "-4", "route", "show", "table", str(DEFAULT_ROUTE_TABLE)],
    ["ip", "-6", "route", "show", "table", str(DEFAULT_ROUTE_TABLE)],
)
# Traffic changes counters between two snapshots of the same rules.
COUNTERS = re.compile(r"\[\d+:\d+\]|counter packets \d+ bytes \d+")


def lab_settings(mode, **changes) -> RuleSettings:
    # Every lab address is in 10.77.0.0/16 or fd77::/16: with private ranges exempt,
    # nothing in the lab would ever be intercepted.
    return RuleSettings(
        mode=mode, port=RELAY_PORT, lan_ifaces=(ADDR.router_lan_if,), mark=MARK, exempt_private=False, **changes
    )


class RouterFirewall:
    """apply()/remove() from relay.rules, run by a Python inside the router's namespace."""

    def __init__(self, lab):
        self.lab = lab
        self.applied = []
        # iptables-nft creates a table's built-in chains the first time a rule needs them and
        # leaves them (with legacy iptables they always exist); they are the host's, not ours,
        # so create them before taking the "before" picture.
        for tool in ("iptables", "ip6tables"):
            for table, chains in (("nat", ("PREROUTING", "OUTPUT")), ("mangle", ("PREROUTING", "OUTPUT"))):
                for chain in chains:
                    lab.run("router", [tool, "-w", "5", "-t", table, "-P", chain, "ACCEPT"])
            for chain in ("FORWARD", "OUTPUT"):  # where the UDP rules jump from
                lab.run("router", [tool, "-w", "5", "-t", "filter", "-P", chain, "ACCEPT"])
        self.before = self.state()

    def state(self) -> str:
        """Everything the rules may touch, as text."""
        # A route table with no routes does not exist, and showing it fails.
        text = "\n".join(self.lab.run("router", command, check=False).stdout for command in STATE_COMMANDS)
        return COUNTERS.sub("", "\n".join(line for line in text.splitlines() if not line.startswith("#")))

    def apply(self, settings, backend):
        self.applied.append((settings, backend))
        self._call("apply", settings, backend)

    def remove(self, settings, backend):
        self._call("remove", settings, backend)

    def _call(self, action, settings, backend):
        code = f"import relay.rules as rules; rules.{action}(rules.{settings!r}, {backend!r})"
        self.lab.run("router", [sys.executable, "-c", code])


@pytest.fixture
def firewall(lab):
    firewall = RouterFirewall(lab)
    yield firewall
    for settings, backend in firewall.applied:
        firewall.remove(settings, backend)
    assert firewall.state() == firewall.before


@pytest.fixture
def dante_relays(relays):
    """start(mode, *extra_args): the relay on the router via dante, with no interception: the rules
    under test do that."""

    def start(mode, *extra):
        return relays.start(
            [
                "--upstream",
                UPSTREAMS["dante"],
                "--mode",
                mode,
                *extra,
                "--listen",
                f"0.0.0.0:{RELAY_PORT}",
                "--listen",
                f"[::]:{RELAY_PORT}",
            ]
        )

    return start


@contextlib.contextmanager
def routes_to_server(lab, far_forwards: bool):
    """A route from the router to the server network; with ``far_forwards``, far forwards both ways,
    so the router can reach the server without any proxy."""
    router = [("-4", "10.77.3.0/24", ADDR.far4), ("-6", "fd77:3::/64", ADDR.far6)]
    far = [("-4", "10.77.1.0/24", ADDR.router_wan4), ("-6", "fd77:1::/64", ADDR.router_wan6)]
    added = [("router", route) for route in router] + ([("far", route) for route in far] if far_forwards else [])
    if far_forwards:
        lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    try:
        for host, (family, network, gateway) in added:
            lab.run(host, ["ip", family, "route", "add", network, "via", gateway])
        yield
    finally:
        for host, (family, network, _) in added:
            lab.run(host, ["ip", family, "route", "del", network], check=False)
        if far_forwards:
            lab.run("far", ["sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])


def download_from(lab, host, address, seed=1):
    with lab.connect(host, address, TRAFFIC_PORT, timeout=10) as sock:
        sock.sendall(f"DOWN {SIZE} {seed}\n".encode())
        assert read_all(sock) == (SIZE, pattern_sha256(SIZE, seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lan_traffic_goes_through_the_relay_and_remove_undoes_everything(lab, firewall, dante_relays, backend, mode):
    relay = dante_relays(mode, "--mark", hex(MARK))
    settings = lab_settings(mode)
    firewall.apply(settings, backend)
    download(lab, SIZE, address=ADDR.server4)
    download(lab, SIZE, address=ADDR.server6)
    assert [line["dst"] for line in relay.connections(at_least=2)] == [
        f"{ADDR.server4}:{TRAFFIC_PORT}",
        f"[{ADDR.server6}]:{TRAFFIC_PORT}",
    ]

    applied_once = firewall.state()
    firewall.apply(settings, backend)
    assert firewall.state() == applied_once  # nothing duplicated
    download(lab, SIZE, address=ADDR.server4)
    assert len(relay.connections(at_least=3)) == 3

    firewall.remove(settings, backend)
    assert firewall.state() == firewall.before
    # The router has no route to the server network: without the relay nothing gets there.
    for address in (ADDR.server4, ADDR.server6):
        with pytest.raises(OSError):
            connect(lab, address, timeout=2).close()
    assert len(relay.connections()) == 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bypassed_address_is_reached_directly(lab, firewall, dante_relays, backend, mode):
    relay = dante_relays(mode, "--mark", hex(MARK))
    firewall.apply(lab_settings(mode, exempt=(ADDR.server4,)), backend)
    with routes_to_server(lab, far_forwards=True):
        download(lab, SIZE, address=ADDR.server4)  # bypassed: routed by the router and far
        download(lab, SIZE, address=ADDR.server6)  # not bypassed: through the relay
    assert [line["dst"] for line in relay.connections(at_least=1)] == [f"[{ADDR.server6}]:{TRAFFIC_PORT}"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_routers_own_traffic_goes_through_the_relay_without_a_loop(
    lab, session_tunnels_survive, firewall, dante_relays, backend, mode
):
    """The relay's own upstream connections leave the router too: only their mark keeps them
    from being intercepted (dante's address is not exempt here)."""
    relay = dante_relays(mode, "--mark", hex(MARK))
    firewall.apply(lab_settings(mode, redirect_output=True), backend)
    # A route, so the router's connections get as far as the firewall; far does not forward.
    with routes_to_server(lab, far_forwards=False):
        download_from(lab, "router", ADDR.server4)
        download_from(lab, "router", ADDR.server6)
        # LAN clients still work: the relay's answers to them are not taken for the router's own traffic.
        download(lab, SIZE, address=ADDR.server4)
    lines = relay.connections(at_least=3)
    assert [(line["dst"], line["end"]) for line in lines] == [
        (f"{ADDR.server4}:{TRAFFIC_PORT}", "closed"),
        (f"[{ADDR.server6}]:{TRAFFIC_PORT}", "closed"),
        (f"{ADDR.server4}:{TRAFFIC_PORT}", "closed"),
    ]
    assert lines[0]["client"].startswith(ADDR.router_wan4 + ":")
    assert lines[2]["client"].startswith(ADDR.client4 + ":")
    assert "routing loop" not in relay.log_text()


def echoed(sock, text: bytes) -> bytes:
    sock.sendall(text)
    return sock.recv(100)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_taking_the_routers_own_traffic_leaves_its_open_connections_and_inbound_ones_alone(
    lab, session_tunnels_survive, firewall, dante_relays, backend, mode
):
    """A packet of a connection the relay does not hold meets a reset at its listener. So only connections
    opened after the rules may be taken: not one the router opened before (its ssh tunnel, say), nor the
    answers to one that came in (an administrator's ssh login). Conntrack only starts in the router's
    namespace with the rules, as on a router with no stateful firewall: it first sees these mid-stream."""
    echo = TrafficServer(lab, "far", ADDR.far4, FAR_ECHO_PORT)
    inbound_listener = lab.socket("router")
    with contextlib.ExitStack() as stack:
        stack.callback(echo.close)
        stack.enter_context(inbound_listener)
        outbound = stack.enter_context(lab.connect("router", ADDR.far4, FAR_ECHO_PORT, timeout=5))
        outbound.sendall(b"ECHO\n")
        assert echoed(outbound, b"before") == b"before"
        inbound_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        inbound_listener.bind((ADDR.router_wan4, INBOUND_PORT))
        inbound_listener.listen(1)
        inbound_far_end = stack.enter_context(lab.connect("far", ADDR.router_wan4, INBOUND_PORT, timeout=5))
        inbound, _ = inbound_listener.accept()
        stack.enter_context(inbound)
        inbound.settimeout(5)
        relay = dante_relays(mode, "--mark", hex(MARK))
        firewall.apply(lab_settings(mode, redirect_output=True), backend)

        assert echoed(outbound, b"after") == b"after"
        inbound_far_end.sendall(b"question")
        assert echoed(inbound, b"answer") == b"question"
        assert inbound_far_end.recv(100) == b"answer"
        with lab.connect("router", ADDR.far4, FAR_ECHO_PORT, timeout=5) as opened_after:
            opened_after.sendall(b"ECHO\n")
            assert echoed(opened_after, b"taken") == b"taken"
        [line] = relay.connections(at_least=1)  # only the connection opened after the rules
        assert line["dst"] == f"{ADDR.far4}:{FAR_ECHO_PORT}" and line["client"].startswith(ADDR.router_wan4 + ":")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lan_connection_under_way_when_the_rules_go_in_goes_on_around_the_relay(
    lab, firewall, dante_relays, backend, mode
):
    """The same for connections the router forwards: one a LAN client opened before the rules (routed
    by the router and far) goes on as it was; the next one is the relay's."""
    relay = dante_relays(mode, "--mark", hex(MARK))
    with routes_to_server(lab, far_forwards=True):
        with lab.connect("client", ADDR.server4, TRAFFIC_PORT, timeout=5) as under_way:
            under_way.sendall(b"ECHO\n")
            assert echoed(under_way, b"before") == b"before"
            firewall.apply(lab_settings(mode), backend)
            assert echoed(under_way, b"after") == b"after"
            download(lab, SIZE, address=ADDR.server4)
            assert echoed(under_way, b"still") == b"still"
    [line] = relay.connections(at_least=1)
    assert line["dst"] == f"{ADDR.server4}:{TRAFFIC_PORT}" and line["end"] == "closed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_mark_the_relay_refuses_its_own_looped_connection(
    lab, session_tunnels_survive, firewall, dante_relays, backend
):
    relay = dante_relays("redirect")  # no --mark: the firewall cannot tell its connections apart
    firewall.apply(lab_settings("redirect", redirect_output=True), backend)
    with routes_to_server(lab, far_forwards=False):
        try:
            with lab.connect("router", ADDR.server4, TRAFFIC_PORT, timeout=10) as sock:
                expect_reset(sock, within=5)
        except ConnectionResetError:
            pass  # the reset came before connect() returned
    assert relay.wait_for_log("routing loop")
    [line] = relay.connections(at_least=1)
    assert line["end"].startswith("refused:")
    assert relay.running
    assert len(os.listdir(f"/proc/{lab.process(relay.name).pid}/fd")) < 30


# -- --dns: the LAN's port 53 to the DNS service ------------------------------------

DNS_SERVICE_PORT = 5353
SERVICE_ANSWER = "192.0.2.53"  # what the stand-in for relay's DNS service answers
FAR_ANSWER = "192.0.2.99"  # what the resolver on far answers
# Resolvers a LAN client may have been given: one it could reach through the router, one nowhere,
# and the router itself (where nothing listens on port 53).
CLIENT_RESOLVERS = (ADDR.far4, "198.51.100.1", ADDR.router_lan4, ADDR.far6, "2001:db8::53", ADDR.router_lan6)


@contextlib.contextmanager
def dns_responders(lab, host, addresses, port, answer):
    responders = [DnsResponder(lab, host, address, port, answer) for address in addresses]
    try:
        yield responders
    finally:
        for responder in responders:
            responder.close()


FAR_DNS4 = "10.77.2.53"  # far's own port 53 on ADDR.far4 belongs to the session's unbound


@pytest.fixture
def far_resolver(lab):
    """A resolver on far's port 53, which the router reaches directly."""
    lab.run("far", ["ip", "addr", "add", f"{FAR_DNS4}/24", "dev", ADDR.far_if])
    try:
        with dns_responders(lab, "far", (FAR_DNS4, ADDR.far6), 53, FAR_ANSWER) as responders:
            yield responders
    finally:
        lab.run("far", ["ip", "addr", "del", f"{FAR_DNS4}/24", "dev", ADDR.far_if])


def dig(lab, host, resolver, transport="+notcp") -> str:
    """The A record ``resolver`` gives for a name, asked from ``host``; dig's complaint if none."""
    command = ["dig", "+short", "+time=2", "+tries=1", transport, f"@{resolver}", "probe.example", "A"]
    result = lab.run(host, command, check=False)
    return (result.stdout + result.stderr).strip()


def answers(lab, host, resolvers) -> dict:
    return {
        (resolver, transport): dig(lab, host, resolver, transport)
        for resolver in resolvers
        for transport in ("+notcp", "+tcp")
    }


@pytest.mark.parametrize(
    "bound", [("0.0.0.0", ADDR.router_lan6), (ADDR.router_lan4, "::")], ids=["v4-wildcard+v6-lan", "v4-lan+v6-wildcard"]
)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_lans_dns_goes_to_the_dns_service_whichever_resolver_it_asks(
    lab, firewall, dante_relays, far_resolver, backend, mode, bound
):
    """A wildcard --dns address is reached by REDIRECT, any other by DNAT; the router's own queries
    and TCP to other ports are left as they were."""
    relay = dante_relays(mode, "--mark", hex(MARK))
    settings = lab_settings(mode, dns=tuple((address, DNS_SERVICE_PORT) for address in bound))
    with dns_responders(lab, "router", bound, DNS_SERVICE_PORT, SERVICE_ANSWER) as service:
        firewall.apply(settings, backend)
        asked = answers(lab, "client", CLIENT_RESOLVERS)
        assert asked == dict.fromkeys(asked, SERVICE_ANSWER)
        for responder, client in zip(service, (ADDR.client4, ADDR.client6)):
            assert sorted(responder.queries) == [("tcp", client)] * 3 + [("udp", client)] * 3

        # The router's own queries go where they are sent, over UDP and TCP alike.
        own = answers(lab, "router", (FAR_DNS4, ADDR.far6))
        assert own == dict.fromkeys(own, FAR_ANSWER)
        assert [sorted(resolver.queries) for resolver in far_resolver] == [
            [("tcp", ADDR.router_wan4), ("udp", ADDR.router_wan4)],
            [("tcp", ADDR.router_wan6), ("udp", ADDR.router_wan6)],
        ]

        # Other TCP still goes to the relay, and no port 53 ever reached it.
        download(lab, SIZE, address=ADDR.server4)
        assert [line["dst"] for line in relay.connections(at_least=1)] == [f"{ADDR.server4}:{TRAFFIC_PORT}"]

        firewall.remove(settings, backend)
        assert "192.0.2" not in dig(lab, "client", ADDR.router_lan4) + dig(lab, "client", ADDR.far4, "+tcp")
        assert len(service[0].queries) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dns_service_on_loopback_is_reached_only_with_route_localnet(lab, firewall, backend):
    settings = lab_settings("redirect", dns=(("127.0.0.1", DNS_SERVICE_PORT), (ADDR.router_lan6, DNS_SERVICE_PORT)))
    route_localnet = f"net.ipv4.conf.{ADDR.router_lan_if}.route_localnet"
    with dns_responders(lab, "router", ("127.0.0.1", ADDR.router_lan6), DNS_SERVICE_PORT, SERVICE_ANSWER):
        with pytest.raises(LabCommandError) as refused:
            firewall.apply(settings, backend)
        assert f"sysctl -w {route_localnet}=1" in refused.value.stderr
        assert firewall.state() == firewall.before  # refused before anything was installed

        lab.run("router", ["sysctl", "-qw", f"{route_localnet}=1"])
        try:
            firewall.apply(settings, backend)
            asked = answers(lab, "client", (ADDR.far4, ADDR.far6))
            assert asked == dict.fromkeys(asked, SERVICE_ANSWER)
        finally:
            lab.run("router", ["sysctl", "-qw", f"{route_localnet}=0"])
        # What the check is for: without it, the kernel drops what was DNATed to loopback as a martian.
        assert "timed out" in dig(lab, "client", ADDR.far4)


class UdpEcho:
    """Sends every datagram back, IPv4 and IPv6, on the server host: what QUIC and other UDP reach there."""

    def __init__(self, lab, port: int):
        self.sock = lab.socket("server", socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
                if peer is None:
                    return  # shut down
                self.sock.sendto(data, peer)
            except OSError:
                return  # closed

    def close(self):
        with contextlib.suppress(OSError):  # unconnected: shutdown wakes the thread, then says ENOTCONN
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def udp_exchange(lab, address: str, port: int) -> str:
    """ "echo", "refused" (an ICMP port unreachable came back) or "timeout", for one datagram from the client."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with lab.socket("client", family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.connect((address, port))
        sock.send(b"quic?")
        try:
            return "echo" if sock.recv(100) == b"quic?" else "garbled"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"


@pytest.mark.parametrize("policy", ["quic", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_lans_quic_is_refused_at_once_and_other_udp_left_alone(lab, firewall, backend, policy, figures):
    """The relay carries TCP only: UDP to 443 (or all UDP) from the LAN gets an ICMP port unreachable from the
    router where its TCP would be intercepted, so a QUIC client falls back to TCP at once."""
    echoes = [UdpEcho(lab, port) for port in (443, 4443)]
    with contextlib.ExitStack() as stack, routes_to_server(lab, far_forwards=True):
        for echo in echoes:
            stack.callback(echo.close)
        for address in (ADDR.server4, ADDR.server6):
            assert [udp_exchange(lab, address, port) for port in (443, 4443)] == ["echo", "echo"]
        firewall.apply(lab_settings("redirect", udp_reject=policy), backend)
        for address in (ADDR.server4, ADDR.server6):
            started = time.monotonic()
            assert udp_exchange(lab, address, 443) == "refused"
            figures(f"QUIC to {address} refused after", f"{(time.monotonic() - started) * 1000:.1f} ms")
            assert udp_exchange(lab, address, 4443) == ("refused" if policy == "all" else "echo")
        firewall.remove(lab_settings("redirect", udp_reject=policy), backend)
        assert udp_exchange(lab, ADDR.server4, 443) == "echo"


def quic_initial(address: str) -> bytes:
    """The first datagram a real QUIC client (aioquic, asking for HTTP/3) sends: its Initial packet."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"]))
    quic.connect((address, 443), now=time.monotonic())
    [(datagram, _)] = quic.datagrams_to_send(now=time.monotonic())
    assert datagram[0] & 0xF0 == 0xC0  # a long header, type Initial
    return datagram


def test_a_quic_client_behind_an_http_only_upstream_falls_back_to_https_over_tcp_at_once(
    lab, relays, firewall, figures
):
    """A browser tries HTTP/3 first: its Initial is refused by ICMP as it leaves the LAN, so it goes to TCP
    at once (instead of after its QUIC timeout), and that HTTPS request goes through the relay to squid."""
    import trustme

    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(ADDR.server4).configure_cert(tls)
    https = HttpServer(lab, "server", ADDR.server4, 443, tls=tls)
    udp_echo = UdpEcho(lab, 443)
    initial = quic_initial(ADDR.server4)
    with contextlib.ExitStack() as stack, routes_to_server(lab, far_forwards=True):
        stack.callback(https.close)
        stack.callback(udp_echo.close)
        with lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) as quic:
            quic.settimeout(3)
            quic.connect((ADDR.server4, 443))
            quic.send(initial)
            assert quic.recv(2048) == initial  # without the rules the LAN's UDP 443 reaches the server
        relay = relays.start(
            ["--upstream", f"http://{ADDR.far4}:3128", "--mode", "redirect", "--mark", hex(MARK)]
            + ["--listen", f"0.0.0.0:{RELAY_PORT}"]
        )
        firewall.apply(lab_settings("redirect", udp_reject="quic"), "nft")

        started = time.monotonic()
        with lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM) as quic:
            quic.settimeout(3)
            quic.connect((ADDR.server4, 443))
            quic.send(initial)
            with pytest.raises(ConnectionRefusedError):  # an ICMP port unreachable, not silence
                quic.recv(2048)
        refused = time.monotonic() - started
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
        with lab.connect("client", ADDR.server4, 443, timeout=10) as raw:
            with client_tls.wrap_socket(raw, server_hostname=ADDR.server4) as sock:
                sock.sendall(f"GET /hello HTTP/1.1\r\nHost: {ADDR.server4}\r\nConnection: close\r\n\r\n".encode())
                reply = b"".join(iter(lambda: sock.recv(65536), b""))
        answered = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello from the lab server\n")
        [line] = relay.connections(at_least=1)
        assert line["via"] == f"http://{ADDR.far4}:3128" and line["dst"] == f"{ADDR.server4}:443"
        figures(
            "QUIC refused, then HTTPS over TCP through the relay and squid",
            f"{refused * 1000:.1f} ms, then answered after {answered * 1000:.0f} ms",
        )
