"""The connection budget derived from the fd limit."""

import resource

import pytest

from relay.config import Config
from relay.net import admission


@pytest.mark.parametrize("soft,expected", [(256, (256 - 64) // 6), (1024, (1024 - 200) // 6), (20000, 3300), (8, 1)])
def test_budget_from_the_fd_limit(monkeypatch, soft, expected):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft))
    config = Config.from_values({"upstream": ["127.0.0.1:3128"]}, source="test", complete=True)
    assert admission.connection_budget(config) == expected


def test_max_connections_wins(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 256))
    config = Config.from_values(
        {"upstream": ["127.0.0.1:3128"], "max-connections": "5000"}, source="test", complete=True
    )
    assert admission.connection_budget(config) == 5000


HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\trouter.lan router  # Debian's line for the hostname
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
10.0.0.1 Gateway.Example.  admin-panel
10.9.9.9 mirror.example
fe80::1%eth0 linklocal-thing
not-an-address name
#127.0.0.1 commented-out
"""


def test_names_of_own_addresses_are_those_the_hosts_file_maps_to_this_machine():
    own = admission.names_of_own_addresses(HOSTS, lambda host: admission.in_refused_network(host) or host == "10.0.0.1")
    assert own == {
        "localhost", "router.lan", "router", "ip6-localhost", "ip6-loopback", "gateway.example", "admin-panel",
        "linklocal-thing",
    }  # fmt: skip


def test_own_names_include_the_hostname_and_are_read_again_on_load(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    own = admission.OwnNames(lambda host: False, hosts_file=str(hosts), hostname=lambda: "Router.lan")
    assert own("router.lan") and own("router") and own("localhost") and not own("mirror.example")
    hosts.write_text("127.0.1.1 mirror.example\n")
    assert not own("mirror.example")
    own.load()
    assert own("mirror.example") and not own("localhost")


def test_own_names_without_a_hosts_file_are_the_hostname(tmp_path):
    own = admission.OwnNames(lambda host: False, hosts_file=str(tmp_path / "missing"), hostname=lambda: "box")
    assert own.names == {"box"}


@pytest.mark.parametrize(
    "budget,given,cap",
    [(3300, None, 825), (1000, None, 256), (300, None, 256), (37, None, 37), (3300, "0", 0), (3300, "10", 10)],
)
def test_one_client_address_gets_a_share_of_the_budget_by_default(budget, given, cap):
    values = {"upstream": ["127.0.0.1:3128"], **({"max-per-source": given} if given else {})}
    config = Config.from_values(values, source="test", complete=True)
    assert admission.per_source_cap(config, budget) == cap


def test_per_source_refusal_counts_against_the_cap():
    assert admission.per_source_refusal(2, "10.0.0.2", {"10.0.0.2": 1}) is None
    assert "2 connections from 10.0.0.2" in admission.per_source_refusal(2, "10.0.0.2", {"10.0.0.2": 2})
    assert admission.per_source_refusal(0, "10.0.0.2", {"10.0.0.2": 10**6}) is None  # 0: no limit
