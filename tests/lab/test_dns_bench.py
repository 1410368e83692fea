"""bench/dns.py end to end, in a tiny configuration: every contender answers, every miss goes upstream,
every hit comes from the cache, and sshuttle's rules are gone afterwards. No figure is judged here.

Needs root. Without it the test is skipped, except under CI (CI set), where that is a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import root

BENCH = Path(__file__).resolve().parent.parent.parent / "bench" / "dns.py"
TINY = ["--rounds", "1", "--seconds", "0.5", "--concurrency", "4", "--sources", "4", "--hit-names", "10"]


@pytest.fixture
def require_root():
    root.require_root("bench/dns.py needs root (network namespaces, iptables)")


def test_a_tiny_run_measures_every_contender(require_root, tmp_path):
    out = tmp_path / "dns.json"
    argv = [sys.executable, str(BENCH), *TINY, "--rtt-ms", "20", "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert "aborted" not in record
    runs = record["runs"]
    assert {case: sorted(by_name) for case, by_name in runs.items()} == {
        "hit": ["dnsmasq", "relay"],
        "miss": ["relay", "relay-tcp", "sshuttle"],
    }
    for case, by_name in runs.items():
        for name, (run,) in by_name.items():
            assert "error" not in run, (case, name, run)
            assert run["answered"] > 0 and run["timeouts"] == 0 and run["bad"] == {}, (case, name, run)
            assert 0 < run["machine_busy"] <= 1
    for name in ("relay", "relay-tcp"):
        miss = runs["miss"][name][0]
        assert miss["relay_outcomes"] == {"upstream": miss["answered"]}, miss
    hit = runs["hit"]["relay"][0]
    assert hit["relay_outcomes"] == {"cache": hit["answered"]}, hit
    assert record["checks"]["sshuttle rules left after it stopped"] == []
    assert "relay/base" in result.stdout and "raw results:" in result.stdout
