"""Every benchmark starts: its imports resolve and its options parse (a merge once left one calling a
function of another by its old signature; this catches the imports and names, not the calls)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path for path in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in path.read_text())
# Run with -P by bench/dns.py, as here: with bench/ first on sys.path, its dns.py would hide dnspython.
WITHOUT_SCRIPT_DIRECTORY = {"dnsload"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_a_benchmark_shows_its_help(script):
    target = ["-P", str(script)] if script.stem in WITHOUT_SCRIPT_DIRECTORY else [str(script)]
    result = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
