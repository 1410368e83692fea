"""The server's part in fake-ip mode: the pool it builds, its metrics, what a reload changes of it."""

import trio

from relay.config import Config
from relay.metrics import Metrics
from relay.net.server import Server


def fake_ip_config(**values) -> Config:
    base = {"upstream": ["127.0.0.1:3128"], "dns": ["127.0.0.1:53"], "dns-mode": "fake-ip"}
    return Config.from_values({**base, **values})


def test_fake_ip_mode_gives_the_dns_service_and_the_metrics_one_pool_and_real_mode_none():
    server = Server(fake_ip_config(), Metrics(version="t", fast_path="python"))
    assert server.fake_ips is not None and server.dns.fake_ips is server.fake_ips is server.metrics.fake_ips
    real = Server(fake_ip_config(**{"dns-mode": "real"}), Metrics(version="t", fast_path="python"))
    assert real.fake_ips is None and real.dns.fake_ips is None


async def test_a_reload_changes_the_exclusions_but_not_the_ranges_or_the_state_dir(caplog):
    server = Server(fake_ip_config(), Metrics(version="t", fast_path="python"))
    server.reload = lambda: fake_ip_config(
        **{"fake-ip-exclude": ["corp.example"], "bypass-domain": ["cdn.example"], "fake-ip-range": ["10.99.0.0/24"]},
        **{"state-dir": "/elsewhere"},
    )
    async with trio.open_nursery() as services:
        health = await services.start(server.run_health_checks, server.pool)
        health = await server.apply_reload(services, health)
        services.cancel_scope.cancel()
    assert server.fake_ips.excluded == ["corp.example", "cdn.example"]
    assert [str(network) for network in server.fake_ips.networks] == ["198.18.0.0/15", "fc00::/18"]
    assert server.config.state_dir == "/var/lib/relay"
    assert "fake-ip-range, state-dir only change on restart" in caplog.text
