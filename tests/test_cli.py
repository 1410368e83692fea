"""The command line, as users run it: exit codes, one-line errors, start and stop."""

import os
import signal
import subprocess
import sys
import time

import pytest

RELAY = [sys.executable, "-m", "relay"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root")


def run(args, env=None, timeout=20, prefix=()):
    return subprocess.run(
        [*prefix, *RELAY, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_version_names_the_active_fast_path():
    assert "fast path: cython extension" in run(["--version"]).stdout
    pure = run(["--version"], env={"RELAY_NO_EXTENSIONS": "1"}).stdout
    assert pure.startswith("relay ") and "pure python, forced by RELAY_NO_EXTENSIONS" in pure


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "an upstream is required"),
        (["--upstream", "gopher://h:70"], "unknown scheme"),
        (["--upstream", "h:99999"], "out of range"),
        (["--upstream", "http://u:hunter2@h"], "a port is required"),
        (["--upstream", "h:1", "--mode", "bridge"], "--mode: 'bridge' is not one of: redirect, tproxy"),
        (["--upstream", "h:1", "--listen", "nowhere"], "invalid listen address"),
        (["--upstream", "h:1", "--mark", "-3"], "between 1 and"),
        (["--upstream", "h:1", "--idle-timeout", "0"], "--idle-timeout: '0' is not a number of seconds above 0"),
        (["--upstream", "h:1", "--name-wait", "0"], "--name-wait: '0' is not a number of seconds above 0"),
        (["--upstream", "h:1", "--workers", "0"], "--workers: '0' is not a whole number of at least 1"),
        (["--upstream", "h:1", "--bypass", "10.0.0.0/33"], "--bypass: invalid CIDR"),
        (["--upstream", "h:1", "--bogus"], "unrecognized arguments"),
        (["--upstrem", "socks5://u:hunter2@h:1"], "unrecognized arguments: --upstrem socks5://***@h:1"),
        (["--upstream", "h:1", "--ups=socks5://u:a://hunter2@h:1"], "ambiguous option: --ups=socks5://***@h:1"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(args, message):
    result = run(args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: error:") and message in lines[0], result.stderr
    assert "hunter2" not in result.stderr


def _start_and_stop(prefix, args):
    process = subprocess.Popen([*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        output = ""
        while "listening on" not in output:
            assert time.monotonic() < deadline and process.poll() is None, output
            output += process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        output += process.communicate(timeout=10)[0]
    finally:
        process.kill()
    return process.returncode, output


@needs_root
def test_upstream_exactly_as_written_in_the_docs():
    """`relay --upstream 127.0.0.1:3128`, in a fresh network namespace so port 12345 is ours."""
    command = os.path.join(os.path.dirname(sys.executable), "relay")
    assert os.access(command, os.X_OK), "the console script 'relay' is not installed beside python"
    code, output = _start_and_stop(["unshare", "--net", "--"], [command, "--upstream", "127.0.0.1:3128"])
    assert code == 0, output
    assert (
        "listening on 0.0.0.0:12345, [::]:12345 (redirect)" in output
        or "listening on 0.0.0.0:12345 (redirect)" in output
    )
    assert "SIGTERM: not accepting; draining 0 connections" in output


def test_python_dash_m_starts_and_stops_on_sigint(unused_port):
    code, output = _start_and_stop([], [*RELAY, "--upstream", "127.0.0.1:3128", "--listen", f"127.0.0.1:{unused_port}"])
    assert code == 0 and f"127.0.0.1:{unused_port}" in output


def test_port_in_use_is_a_clear_error(unused_port):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", unused_port))
        taken.listen()
        result = run(["--upstream", "127.0.0.1:3128", "--listen", f"127.0.0.1:{unused_port}"])
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"cannot listen on 127.0.0.1:{unused_port}: Address already in use")
    assert "Traceback" not in result.stderr


@needs_root
@pytest.mark.parametrize(
    "args,message",
    [(["--mode", "tproxy"], "--mode tproxy needs CAP_NET_ADMIN"), (["--mark", "1"], "--mark needs CAP_NET_ADMIN")],
)
def test_missing_capability_is_a_clear_error(unused_port, args, message):
    """Run without CAP_NET_ADMIN and CAP_NET_RAW (either lets IP_TRANSPARENT through): one line, status 2."""
    drop = ["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw"]
    result = run(["--upstream", "127.0.0.1:3128", "--listen", f"127.0.0.1:{unused_port}", *args], prefix=drop)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"relay: error: {message} (run as root, or grant the capability)"]


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_password_with_url_delimiters_is_in_no_error():
    """`#`, `/`, `?` used to cut the URL short, and the parser's message quoted what came before."""
    result = run(["--upstream", "socks5://admin:Hunter#24@127.0.0.1:99999"])
    assert result.returncode == 2 and "out of range" in result.stderr and "Hunter" not in result.stderr
    rules = run(["rules", "--mark", "1", "--upstream", "socks5://admin:Hunter/24@127.0.0.1:port"])
    assert rules.returncode == 2 and "not a number" in rules.stderr and "Hunter" not in rules.stderr
    rules = run(["rules", "--mark", "1", "--upstream", "socks5://admin:Hunter?24@127.0.0.1:1081"])
    assert rules.returncode == 0 and "Hunter" not in rules.stdout + rules.stderr, rules.stderr


def test_rules_with_dns_print_its_chain_or_say_what_is_missing():
    rules = ["rules", "--mark", "1", "--upstream", "127.0.0.1:3128", "--lan-iface", "lan0", "--dns", "0.0.0.0:5353"]
    both = run([*rules, "--dns", "[fd00::1]:5353"])
    assert both.returncode == 0, both.stderr
    assert 'iifname { "lan0" } meta nfproto ipv6 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd00::1]:5353' in (
        both.stdout
    )
    v4_only = run(rules)
    assert v4_only.returncode == 2 and v4_only.stdout == ""
    assert v4_only.stderr.splitlines() == [
        "relay rules: error: --dns has no IPv6 address, so the LAN's DNS over IPv6 would pass it by: "
        "add one, such as [::]:5353"
    ]


def test_an_unreadable_password_file_is_one_line_and_status_2(tmp_path):
    result = run(["--upstream", "socks5://admin@h:1", "--upstream-password-file", str(tmp_path / "missing")])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"relay: error: --upstream-password-file: cannot read {tmp_path / 'missing'}: No such file or directory"
    ]


def test_help_says_where_to_keep_a_password():
    shown = " ".join(run(["--help"]).stdout.split())
    assert "--upstream-password-file FILE" in shown and "/proc/PID/cmdline" in shown


def _start(args):
    """A relay started in the background, with what it has printed up to "listening on"."""
    process = subprocess.Popen([*RELAY, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, _read_until(process, "listening on")


def _read_until(process, text: str) -> str:
    deadline = time.monotonic() + 15
    output = ""
    while text not in output:
        assert time.monotonic() < deadline and process.poll() is None, output
        output += process.stdout.readline()
    return output


def _reload_and_stop(process, change) -> str:
    """Make ``change``, SIGHUP, then SIGTERM: what the relay printed from then on."""
    try:
        change()
        process.send_signal(signal.SIGHUP)
        output = _read_until(process, "SIGHUP")
        process.send_signal(signal.SIGTERM)
        return output + process.communicate(timeout=10)[0]
    finally:
        process.kill()


def test_a_reloaded_config_file_with_a_hash_in_a_password_shows_none(tmp_path, unused_port):
    config = tmp_path / "relay.toml"
    listen = f'listen = ["127.0.0.1:{unused_port}"]\n'
    config.write_text('upstream = ["127.0.0.1:3128"]\n' + listen)
    process, _ = _start(["--config", str(config)])
    output = _reload_and_stop(
        process, lambda: config.write_text('upstream = ["socks5://admin:Hunter#2024@127.0.0.1:1081"]\n' + listen)
    )
    assert "configuration reloaded; upstream socks5://admin:***@127.0.0.1:1081" in output and "Hunter" not in output


def test_a_reload_reads_the_password_file_again(tmp_path, unused_port):
    password = tmp_path / "password"
    password.write_text("Hunter-1\n")
    process, _ = _start(
        ["--upstream", "socks5://admin@127.0.0.1:1081", "--upstream-password-file", str(password)]
        + ["--listen", f"127.0.0.1:{unused_port}"]
    )
    output = _reload_and_stop(process, password.unlink)
    assert f"keeping the old configuration: --upstream-password-file: cannot read {password}" in output
    assert "Hunter" not in output
