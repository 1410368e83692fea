"""contrib/grafana-dashboard.json queries only metrics relay exports, and is a dashboard Grafana can load."""

import json
import re
from pathlib import Path

from relay.metrics import Metrics

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana-dashboard.json"
METRIC = re.compile(r"\brelay_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class _FakeIps:
    def in_use(self):
        return {4: 1, 6: 0}

    def recycled(self):
        return 0


def exported(tmp_path) -> set[str]:
    """Every sample name a relay can export: each family rendered, the optional ones (fake-ip, conntrack) too."""
    metrics = Metrics(version="1", fast_path="x")
    metrics.fake_ips = _FakeIps()
    metrics.conntrack_dir = str(tmp_path)
    (tmp_path / "nf_conntrack_count").write_text("1\n")
    (tmp_path / "nf_conntrack_max").write_text("2\n")
    names = set()
    for line in metrics.render().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update([name + suffix for suffix in HISTOGRAM_SUFFIXES] if kind == "histogram" else [name])
    return names


def queried(dashboard: dict) -> set[str]:
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [variable["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return {name for expression in expressions for name in METRIC.findall(expression)}


def test_every_metric_the_dashboard_queries_is_exported(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported(tmp_path)
    used = queried(dashboard)
    assert used - names == set()
    # What the issue asks it to show: throughput, connections, failures by reason, upstream health, DNS, conntrack.
    for wanted in (
        "relay_bytes_total",
        "relay_connections_active",
        "relay_connections_failed_total",
        "relay_upstream_healthy",
        "relay_dns_queries_total",
        "relay_conntrack_entries",
        "relay_conntrack_max",
    ):
        assert wanted in used


def test_a_misspelt_metric_would_be_caught(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = "rate(relay_byte_total[5m])"
    assert queried(dashboard) - exported(tmp_path) == {"relay_byte_total"}


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        references = [target["refId"] for target in panel["targets"]]
        assert len(references) == len(set(references)), panel["title"]
