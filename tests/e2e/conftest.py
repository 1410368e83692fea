"""One lab for the whole end-to-end session: far host with sshd, squid and two
danted; ssh -L and ssh -D tunnels from the router; servers on the server host.
Each test starts its own relay on the router with the interception it needs."""

import os
import shlex
import shutil

import pytest

from relay.lab import ADDR, Lab, start_dante, start_squid, start_ssh_tunnel, start_sshd, start_unbound
from relay.lab.servers import BannerServer, TrafficServer
from relay.lab.services import clear_interception, intercept, start_relay
from tests import root
from tests.e2e.health import assert_settled, usage

RELAY_PORT = 12345
TRAFFIC_PORT = 7000
BANNER_PORT = 7001
CLOSED_PORT = 7009
DANTE_USER, DANTE_PASSWORD = "relaylab", "Lab-pass-42"

UPSTREAMS = {
    "squid-via-ssh-L": "127.0.0.1:3128",
    "dante": f"socks5://{ADDR.far4}:1080",
    "dante-auth": f"socks5://{DANTE_USER}:{DANTE_PASSWORD}@{ADDR.far4}:1082",
    "ssh-D-socks5": "socks5://127.0.0.1:1081",
    "ssh-D-socks4": "socks4://127.0.0.1:1081",
    "ssh-D-socks4a": "socks4a://127.0.0.1:1081",
}
# squid closes a CONNECT tunnel both ways on the first FIN: half-close needs the others.
HALF_CLOSE_UPSTREAMS = [name for name in UPSTREAMS if not name.startswith("squid")]


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def lab():
    require_root()
    with Lab() as lab:
        lab.sshd = sshd = start_sshd(lab)
        lab.squid = start_squid(lab, listen=[("127.0.0.1", 3128), (ADDR.far4, 3128)])
        start_dante(lab)
        start_dante(lab, listen=[(ADDR.far4, 1082)], auth=(DANTE_USER, DANTE_PASSWORD), name="dante-auth")
        lab.tunnels = [
            start_ssh_tunnel(lab, sshd, forwards=("-L", "127.0.0.1:3128:127.0.0.1:3128"), name="ssh-L"),
            start_ssh_tunnel(lab, sshd, forwards=("-D", "127.0.0.1:1081"), name="ssh-D"),
        ]
        lab.traffic = TrafficServer(lab, "server", "::", TRAFFIC_PORT)
        BannerServer(lab, "server", "::", BANNER_PORT)
        yield lab


@pytest.fixture
def session_tunnels_survive(lab):
    """For a test that intercepts the router's own traffic (--redirect-output): the session's ssh
    tunnels, opened before the rules, must not be taken by them (one that was would end when its next
    packet met the relay's listener). Any that ended is started again for the tests after."""
    yield
    ended = [tunnel.name for tunnel in lab.tunnels if not tunnel.running]
    for tunnel in lab.tunnels:
        if not tunnel.running:
            tunnel.start()
    assert not ended, f"the rules ended the router's open ssh tunnels: {ended}"


class Relays:
    """Relays started on the lab's router for one test; ``finish()`` stops them all and checks
    that each exited cleanly and logged no traceback."""

    def __init__(self, lab):
        self.lab = lab
        self.started = []
        self.intercepted = False

    def start(self, args, *, name="relay", intercept_mode=None, **options):
        """``intercept_mode`` ("redirect"/"tproxy") first installs the lab's own interception."""
        if intercept_mode:
            clear_interception(self.lab)
            intercept(self.lab, intercept_mode, RELAY_PORT)
            self.intercepted = True
        if (engine := os.environ.get("RELAY_TEST_ENGINE")) and "--engine" not in args:
            # The whole suite with another engine, and that engine's options (README: sockmap).
            args = [*args, "--engine", *shlex.split(engine)]
        relay = start_relay(self.lab, args, name=name, **options)
        relay.baseline = usage(self.lab.process(relay.name).pid)
        self.started.append(relay)
        return relay

    def run(self, upstream, *extra, mode="redirect", pure=False):
        """The usual case: one upstream, listening on IPv4 and IPv6, intercepted by ``mode``."""
        listen = [] if "--listen" in extra else ["--listen", f"0.0.0.0:{RELAY_PORT}", "--listen", f"[::]:{RELAY_PORT}"]
        return self.start(["--upstream", upstream, "--mode", mode, *extra, *listen], intercept_mode=mode, pure=pure)

    def finish(self):
        """Stop every relay (even after a failure), then report the first problem found."""
        problems = []
        for relay in self.started:
            if relay.running:
                try:
                    assert_settled(self.lab, relay, relay.baseline)
                except AssertionError as exc:
                    problems.append(exc)
                relay.stop()
                if self.lab.process(relay.name).returncode != 0:
                    problems.append(AssertionError(self.lab.log_tail(relay.name)))
            if "Traceback" in relay.log_text():
                problems.append(AssertionError(relay.log_text()))
        if self.intercepted:
            clear_interception(self.lab)
        if problems:
            raise problems[0]


_FIGURES: list[tuple[str, str, str]] = []


@pytest.fixture
def figures(request):
    """figures(label, value): a measured figure, printed in the summary at the end of the run."""
    return lambda label, value: _FIGURES.append((request.node.nodeid, label, str(value)))


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures measured by the end-to-end cases")
        for nodeid, label, value in _FIGURES:
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {label}: {value}")


def ssh_args(lab) -> list[str]:
    """--ssh to the lab's sshd as root, with its key and no host key kept."""
    return [
        "--ssh",
        f"root@{lab.sshd.address}",
        "--ssh-identity",
        str(lab.sshd.client_key),
        "--ssh-option",
        "StrictHostKeyChecking=no",
        "--ssh-option",
        "UserKnownHostsFile=/dev/null",
    ]


def require_root():
    root.require_root("end-to-end tests need root (network namespaces, iptables)")


@pytest.fixture(scope="session")
def unbound(lab):
    """The lab's unbound on far (relay.lab.start_unbound): DoH and DNS over TCP that only the proxies reach.
    One for the session: its directory in the lab is named after it."""
    server = start_unbound(lab)
    yield server
    server.stop()


@pytest.fixture
def relays(lab):
    relays = Relays(lab)
    yield relays
    relays.finish()


@pytest.fixture
def run_relay(relays):
    """Start a relay on the router: run_relay(upstream, *extra_args, mode=..., pure=...)."""
    return relays.run


@pytest.fixture
def chromium():
    path = shutil.which("chromium")
    assert path, "chromium is not installed: scripts/setup installs Debian's chromium"
    return path
