"""``relay demo`` as a user runs it: its report and exit status, and teardown after Ctrl-C.

The demo needs root. Without it the tests that run it are skipped, except
under CI (CI set), where that is a failure: CI must run them.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.lab import ADDR, demo
from tests import root

DEMO = [sys.executable, "-m", "relay", "demo"]
LAB_LINE = re.compile(r"lab (?P<prefix>rl\d+x\d+) is up, files in (?P<tmpdir>\S+)")


@pytest.fixture
def require_root():
    root.require_root("relay demo needs root (network namespaces, iptables)")


def _lab_namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{prefix}-")]


def _command_line(pid: int) -> str | None:
    try:
        return Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None


def _leftovers(prefix: str, tmpdir: str, seen: dict[int, str] | None = None) -> list[str]:
    """Namespaces, files and processes of the demo's lab that outlived it.

    ``seen`` maps processes found in the lab's namespaces while it ran to their
    command lines: a pid still there with the same command line is a survivor.
    """
    left = _lab_namespaces(prefix)
    if Path(tmpdir).exists():
        left.append(tmpdir)
    for pid in (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()):
        command = _command_line(pid)
        if command is not None and (tmpdir in command or (seen or {}).get(pid) == command):
            left.append(f"pid {pid}: {command}")
    return left


def _lab_line(stderr: str) -> re.Match:
    match = LAB_LINE.search(stderr)
    assert match, f"no 'lab ... is up' progress line in:\n{stderr}"
    return match


def _read_lines(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")  # end of output


def test_demo_reports_every_transfer_intact_and_cleans_up(require_root):
    result = subprocess.run([*DEMO, "--size-mib", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = result.stdout
    name, wrong, server = re.escape(demo.NAME), re.escape(ADDR.far_server_side4), re.escape(ADDR.server4)
    for transfer in (rf"curl http://{name}/file", rf"curl https://{name}/hello", "DOWN 16 MiB", "DOWN 1 MiB over IPv6"):
        assert re.search(rf"^\s*{transfer}\s.*\sOK$", report, re.MULTILINE), report
    # The client's DNS sent it to the wrong address; the relay asked squid for the name instead.
    for port, end in ((80, r"closed name-from=host http-requests=1"), (443, r"closed name-from=sni")):
        assert re.search(
            rf"^\s*{re.escape(ADDR.client4)}:\d+\s+{wrong}:{port}\s+{name}\s.*\s{end}$", report, re.MULTILINE
        ), report
    for target in (f"{ADDR.server4}:7000", f"[{ADDR.server6}]:7000"):  # by address: no name
        assert re.search(rf"\s{re.escape(target)}\s+-\s.*\sclosed$", report, re.MULTILINE), report
    # squid resolved the name on the far side, to the server.
    assert re.search(
        rf"from 127\.0\.0\.1\s+GET\s+http://{name}/file\s+TCP_\w+/200\s+HIER_DIRECT/{server}$", report, re.MULTILINE
    ), report
    for target, peer in (
        (f"{demo.NAME}:443", ADDR.server4),
        (f"{ADDR.server4}:7000", ADDR.server4),
        (f"[{ADDR.server6}]:7000", ADDR.server6),
    ):
        assert re.search(
            rf"from 127\.0\.0\.1\s+CONNECT {re.escape(target)}\s+TCP_TUNNEL/200\s+"
            rf"HIER_DIRECT/{re.escape(peer)}$",
            report,
            re.MULTILINE,
        ), report
    assert re.search(rf"squid resolved it on the far side to {server}$", report, re.MULTILINE), report
    # The LAN's resolver poisons SSH_NAME; the client's DNS went to the relay's, which asked the far side.
    ssh_name = re.escape(demo.SSH_NAME)
    assert re.search(rf"says {ssh_name} = {wrong};$", report, re.MULTILINE), report
    assert re.search(rf"the client asking it got {server}: answered by the relay", report), report
    assert re.search(
        rf"^\s*{re.escape(ADDR.client4)}:\d+\s+{server}:22\s+{ssh_name}\s.*\sclosed name-from=dns$", report, re.M
    ), report
    assert re.search(rf"CONNECT {ssh_name}:22\s+TCP_TUNNEL/200\s+HIER_DIRECT/{server}$", report, re.M), report
    assert f"'{demo.SSH_GREETING}' in " in report
    assert re.search(r"fast path: \w", report), report
    assert "all checks passed" in report and "FAILED" not in report
    assert 30 <= len(report.splitlines()) <= 45, report
    lab = _lab_line(result.stderr)
    assert _leftovers(lab["prefix"], lab["tmpdir"]) == []


def test_ctrl_c_tears_the_lab_down(require_root):
    # Big enough to still be transferring when interrupted.
    process = subprocess.Popen(
        [*DEMO, "--size-mib", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored; the demo must get Ctrl-C's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stderr, lines), daemon=True).start()
    try:
        stderr = ""
        deadline = time.monotonic() + 60
        while "relay is up" not in stderr:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the relay was not up within 60 s; stderr so far:\n{stderr}")
            if not line:
                pytest.fail(f"the demo exited before the relay was up; stderr:\n{stderr}")
            stderr += line
        lab = _lab_line(stderr)
        namespaces = _lab_namespaces(lab["prefix"])
        assert len(namespaces) == 4, namespaces
        seen = {}
        for namespace in namespaces:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=10)
            for pid in map(int, pids.stdout.split()):
                if (command := _command_line(pid)) is not None:
                    seen[pid] = command
        assert any(" -m relay -v " in command for command in seen.values()), seen

        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == demo.EXIT_INTERRUPTED
    assert _leftovers(lab["prefix"], lab["tmpdir"], seen) == []


def test_without_root_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.main([]) == demo.EXIT_NOT_ROOT
    assert capsys.readouterr().err == "relay demo: needs root (network namespaces, iptables)\n"
