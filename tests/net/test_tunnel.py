"""The ssh tunnel supervisor without a network: target parsing, the ssh command
line, backoff, and supervision of a fake ``ssh`` (a small Python script)."""

import logging
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.config import ConfigError
from relay.net.tunnel import SESSION_COMMAND, SshTarget, SshTunnel, _Tail, backoff_delays, parse_ssh_target

# What every fake ssh shares: where it would listen, a record of each start, and serve().
FAKE_SSH_PRELUDE = """\
#!{python}
import os, socket, sys, time
flag = "-D" if "-D" in sys.argv else "-L"
host, port = sys.argv[sys.argv.index(flag) + 1].split(":")[:2]
with open({starts!r}, "a") as starts:
    starts.write(f"{{os.getpid()}} {{time.monotonic()}}\\n")

def serve(seconds, mode):
    # mode: "socks" answers a SOCKS5 greeting, "hold" keeps connections open, "refuse" closes them at once
    listener = socket.create_server((host, int(port)))
    held = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            break
        if mode == "socks" and conn.recv(3) == b"\\x05\\x01\\x00":
            conn.sendall(b"\\x05\\x00")
        if mode == "refuse":
            conn.close()
        else:
            held.append(conn)
    listener.close()

"""


@pytest.fixture(autouse=True)
def _capture_tunnel_logs(caplog):
    caplog.set_level(logging.INFO, logger="relay")


def fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "ssh"
    path.write_text(FAKE_SSH_PRELUDE.format(python=sys.executable, starts=str(tmp_path / "starts")) + body)
    path.chmod(0o755)
    return str(path)


def starts(tmp_path: Path) -> list[tuple[int, float]]:
    """(pid, time.monotonic()) of each start of the fake ssh so far."""
    path = tmp_path / "starts"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), float(when)) for pid, when in (line.split() for line in lines)]


def exists(pid: int) -> bool:
    """Whether the pid is still taken, even by an unreaped zombie."""
    return Path(f"/proc/{pid}").exists()


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def socks_tunnel(ssh: str, **settings) -> SshTunnel:
    settings = {"backoff_start": 0.05, "backoff_max": 0.2, **settings}
    return SshTunnel(SshTarget("far"), forward="socks", remote=None, local=("127.0.0.1", 0), ssh_binary=ssh, **settings)


async def wait_for_starts(tmp_path, count, timeout=10.0):
    with trio.fail_after(timeout):
        while len(starts(tmp_path)) < count:
            await trio.sleep(0.02)


def restart_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "is down:" in record.getMessage()]


# -- parsing and the command line ----------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("far", SshTarget("far")),
        ("root@far.example.com", SshTarget("far.example.com", None, "root")),
        ("far:2222", SshTarget("far", 2222)),
        ("relay_user@10.0.0.5:22", SshTarget("10.0.0.5", 22, "relay_user")),
        ("[::1]:22", SshTarget("::1", 22)),
        ("me@[fd00::5]", SshTarget("fd00::5", None, "me")),
    ],
)
def test_parse_ssh_target(text, expected):
    assert parse_ssh_target(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "bad host name"),
        ("far:0", "port must be 1-65535"),
        ("far:65536", "port must be 1-65535"),
        ("far:", "port must be 1-65535"),
        ("far:ssh", "port must be 1-65535"),
        ("far:²", "port must be 1-65535"),
        ("@far", "bad user name"),
        ("a@b@far", "bad user name"),
        ("-oProxyCommand=evil", "bad host name"),
        ("me@-far", "bad host name"),
        ("far host", "bad host name"),
        ("::1", "write IPv6 addresses as [ADDR]"),
        ("[::1", "expected [IPV6] or [IPV6]:PORT"),
        ("[::1]22", "expected [IPV6] or [IPV6]:PORT"),
        ("[far]:22", "is not an IPv6 address"),
    ],
)
def test_bad_ssh_targets_raise_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=r"^invalid ssh target .*" + message.replace("[", r"\[")) as error:
        parse_ssh_target(text)
    assert "\n" not in str(error.value)


def test_str_of_a_target_reads_like_the_argument():
    assert str(SshTarget("fd00::5", 2222, "me")) == "me@[fd00::5]:2222"
    assert str(SshTarget("far")) == "far"


def test_argv_for_a_local_forward():
    tunnel = SshTunnel(
        SshTarget("far", 2222, "root"),
        forward="local",
        remote=("127.0.0.1", 3128),
        local=("127.0.0.1", 4000),
        identity="/etc/relay/id_ed25519",
        options=(("ConnectTimeout", "3"), ("Ciphers", "aes128-gcm@openssh.com")),
        alive_interval=2,
        alive_count=4,
    )
    assert tunnel.argv == [
        "ssh",
        "-N",
        "-o",
        "BatchMode=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ControlMaster=no",
        "-o",
        "ControlPath=none",
        # the user's options come before the defaults, so ConnectTimeout=3 wins over 10
        "-o",
        "ConnectTimeout=3",
        "-o",
        "Ciphers=aes128-gcm@openssh.com",
        "-o",
        "ServerAliveInterval=2",
        "-o",
        "ServerAliveCountMax=4",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-i",
        "/etc/relay/id_ed25519",
        "-p",
        "2222",
        "-l",
        "root",
        "-L",
        "127.0.0.1:4000:127.0.0.1:3128",
        "--",
        "far",
    ]
    assert tunnel.description == "-L 127.0.0.1:4000 via root@far:2222 to 127.0.0.1:3128"


def test_argv_for_a_socks_forward_over_ipv6():
    tunnel = SshTunnel(
        SshTarget("fd00::5"),
        forward="socks",
        remote=None,
        local=("::1", 1080),
        ssh_binary="/usr/bin/ssh",
        options=(("BatchMode", "no"),),
    )
    argv = tunnel.argv
    assert argv[:4] == ["/usr/bin/ssh", "-N", "-o", "BatchMode=yes"]  # first value wins: the user cannot undo it
    assert argv[-4:] == ["-D", "[::1]:1080", "--", "fd00::5"]
    assert "-i" not in argv and "-p" not in argv and "-l" not in argv


def test_with_a_session_it_runs_sleep_instead_of_none():
    tunnel = SshTunnel(SshTarget("far"), forward="socks", remote=None, local=("127.0.0.1", 1080), session="on")
    argv = tunnel.argv
    assert argv[:3] == ["ssh", "-n", "-T"] and "-N" not in argv  # stdin never read, no terminal
    assert argv[-3:] == ["--", "far", SESSION_COMMAND]


def test_port_0_means_a_free_port_chosen_at_once():
    tunnel = SshTunnel(SshTarget("far"), forward="local", remote=("10.0.0.1", 3128), local=("127.0.0.1", 0))
    host, port = tunnel.local_address
    assert host == "127.0.0.1" and port > 0
    assert f"127.0.0.1:{port}:10.0.0.1:3128" in tunnel.argv


def test_a_local_address_that_is_not_ours_is_a_config_error():
    with pytest.raises(
        ConfigError, match="^the ssh tunnel cannot listen on 192.0.2.1: Cannot assign requested address$"
    ):
        SshTunnel(SshTarget("far"), forward="socks", remote=None, local=("192.0.2.1", 0))


def test_forward_and_remote_must_agree():
    with pytest.raises(ValueError):
        SshTunnel(SshTarget("far"), forward="local", remote=None, local=("127.0.0.1", 1))
    with pytest.raises(ValueError):
        SshTunnel(SshTarget("far"), forward="socks", remote=("127.0.0.1", 3128), local=("127.0.0.1", 1))


def test_backoff_doubles_up_to_the_cap():
    assert list(islice(backoff_delays(0.5, 30), 9)) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


# -- supervising a fake ssh -----------------------------------------------------------


async def test_ssh_that_exits_is_restarted_with_capped_backoff(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, 'print("Permission denied (publickey).", file=sys.stderr)\nsys.exit(3)\n')
    kinds = []
    tunnel = socks_tunnel(ssh, on_restart=kinds.append)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(tunnel.run)  # started after the first failure: the relay need not wait
        assert not tunnel.up
        await wait_for_starts(tmp_path, 5)
        nursery.cancel_scope.cancel()
    times = [when for _, when in starts(tmp_path)]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(gap >= delay for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2])), gaps
    assert tunnel.restarts >= 4 and set(kinds) == {"exit-3"}
    messages = restart_messages(caplog)
    assert messages[0].startswith("ssh tunnel -D 127.0.0.1:")
    assert "ssh exited with status 3 (ssh said: Permission denied (publickey).); restarting in 0.05 s" in messages[0]
    assert [message.rsplit(" in ", 1)[1] for message in messages[:4]] == ["0.05 s", "0.1 s", "0.2 s", "0.2 s"]
    assert not any(exists(pid) for pid, _ in starts(tmp_path))  # every one reaped


def session_starts(tmp_path: Path) -> list[bool]:
    """Whether each start of the fake ssh so far asked for a session (the fake writes it down)."""
    path = tmp_path / "sessions"
    return [line == "session" for line in path.read_text().splitlines()] if path.exists() else []


def session_record(tmp_path: Path) -> str:
    """The line of a fake ssh that writes down whether it was asked for a session."""
    sessions = str(tmp_path / "sessions")
    return f'open({sessions!r}, "a").write("session\\n" if {SESSION_COMMAND!r} in sys.argv else "none\\n")\n'


def fake_sshd_refusing(tmp_path: Path, status: int) -> str:
    """A fake ssh whose session ends at once with ``status`` (1: the account's shell is nologin; 255: sshd
    refuses the session, as with MaxSessions 0), and that serves the forward without a session (-N)."""
    refusing = f"if {SESSION_COMMAND!r} in sys.argv:\n    sys.exit({status})\n"
    return fake_ssh(tmp_path, session_record(tmp_path) + refusing + 'serve(60, "socks")\n')


def given_up(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "going on without a session" in record.getMessage()]


@pytest.mark.parametrize("status", [1, 255], ids=["command-ended", "session-refused"])
async def test_auto_gives_up_a_session_that_stands_in_the_way(tmp_path, caplog, status):
    tunnel = socks_tunnel(fake_sshd_refusing(tmp_path, status), session="auto")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        assert await tunnel.wait_up(5)
        nursery.cancel_scope.cancel()
    assert session_starts(tmp_path) == [True, False]  # then up without one, and it stays so
    assert "-N" in tunnel.argv and SESSION_COMMAND not in tunnel.argv
    assert len(given_up(caplog)) == 1


async def test_on_keeps_the_session_whatever_happens(tmp_path, caplog):
    tunnel = socks_tunnel(fake_sshd_refusing(tmp_path, 1), session="on")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        await wait_for_starts(tmp_path, 3)
        nursery.cancel_scope.cancel()
    assert not tunnel.up and set(session_starts(tmp_path)) == {True} and not given_up(caplog)


async def test_an_ssh_that_fails_with_and_without_a_session_keeps_trying_both(tmp_path, caplog):
    """The link or the key, not the session: auto does not give the session up for a failure -N shares."""
    tunnel = socks_tunnel(fake_ssh(tmp_path, session_record(tmp_path) + "sys.exit(255)\n"), session="auto")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        await wait_for_starts(tmp_path, 5)
        nursery.cancel_scope.cancel()
    assert session_starts(tmp_path)[:5] == [True, False, True, False, True] and not given_up(caplog)


async def test_up_goes_false_as_soon_as_ssh_exits(tmp_path):
    exited = tmp_path / "exited"
    ssh = fake_ssh(
        tmp_path, f'serve(1.0, "socks")\nopen({str(exited)!r}, "w").write(str(time.monotonic()))\nsys.exit(255)\n'
    )
    kinds = []
    tunnel = socks_tunnel(ssh, probe_interval=60, on_restart=kinds.append)  # only the exit can tell
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(tunnel.run)
        assert tunnel.up  # started once the forward answered
        assert await tunnel.wait_down(5)
        noticed = time.monotonic()
        assert noticed - float(exited.read_text()) < 0.5
        assert await tunnel.wait_up(5)  # and it comes back
        nursery.cancel_scope.cancel()
    assert kinds[0] == "exit-255" and not tunnel.up


async def test_a_healthy_run_resets_the_backoff(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, 'serve(0.4, "socks")\nsys.exit(255)\n')
    tunnel = socks_tunnel(ssh, backoff_start=0.1, backoff_max=0.3, probe_interval=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        await wait_for_starts(tmp_path, 4)
        nursery.cancel_scope.cancel()
    delays = [message.rsplit(" in ", 1)[1] for message in restart_messages(caplog)]
    assert delays[:3] == ["0.1 s"] * 3  # without the reset: 0.1, 0.2, 0.3


async def test_failed_probe_restarts_a_running_ssh_and_reaps_it(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, 'serve(0.5, "socks")\ntime.sleep(60)\n')  # still running, no longer listening
    kinds = []
    tunnel = socks_tunnel(ssh, probe_interval=0.1, on_restart=kinds.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnel.run)
        assert tunnel.up
        await wait_for_starts(tmp_path, 2)
        nursery.cancel_scope.cancel()
    assert kinds[0] == "probe-failed"
    assert "probe failed: connecting to 127.0.0.1:" in restart_messages(caplog)[0]
    assert "failed: Connection refused; restarting" in restart_messages(caplog)[0]
    assert not any(exists(pid) for pid, _ in starts(tmp_path))


async def test_socks_probe_wants_the_greeting_answered(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, 'serve(30, "hold")\n')  # accepts, never answers
    tunnel = socks_tunnel(ssh, probe_timeout=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnel.run)
        assert not tunnel.up
        nursery.cancel_scope.cancel()
    assert "the new forward does not answer: no answer to a SOCKS5 greeting within 0.3 s" in restart_messages(caplog)[0]


async def test_local_forward_is_up_while_channels_stay_open(tmp_path):
    ssh = fake_ssh(tmp_path, 'serve(30, "hold")\n')
    tunnel = SshTunnel(
        SshTarget("far"), forward="local", remote=("127.0.0.1", 3128), local=("127.0.0.1", 0), ssh_binary=ssh
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(tunnel.run)
        assert tunnel.up and tunnel.restarts == 0
        nursery.cancel_scope.cancel()


async def test_local_forward_refused_by_the_far_host_is_down(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, 'serve(30, "refuse")\n')  # like ssh after a channel open failure
    kinds = []
    tunnel = SshTunnel(
        SshTarget("far"),
        forward="local",
        remote=("127.0.0.1", 3128),
        local=("127.0.0.1", 0),
        ssh_binary=ssh,
        backoff_start=5,
        on_restart=kinds.append,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(tunnel.run)
        assert not tunnel.up
        nursery.cancel_scope.cancel()
    assert kinds == ["probe-failed"]
    assert "the far host refused to connect to 127.0.0.1:3128" in restart_messages(caplog)[0]


async def test_ssh_that_never_opens_its_forward_is_restarted(tmp_path, caplog):
    ssh = fake_ssh(tmp_path, "time.sleep(60)\n")  # e.g. stuck logging in
    kinds = []
    tunnel = socks_tunnel(ssh, start_timeout=0.3, on_restart=kinds.append)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(tunnel.run)
        await wait_for_starts(tmp_path, 2)
        nursery.cancel_scope.cancel()
    assert kinds[0] == "start-timeout"
    assert "ssh did not open its forward within 0.3 s" in restart_messages(caplog)[0]
    assert not any(exists(pid) for pid, _ in starts(tmp_path))


async def test_cancelling_stops_ssh_and_its_process_group(tmp_path):
    child = tmp_path / "child"
    ssh = fake_ssh(
        tmp_path,
        "import subprocess\n"  # like a ProxyCommand: a child in ssh's group
        f'open({str(child)!r}, "w").write(str(subprocess.Popen(["sleep", "60"]).pid))\n'
        'serve(60, "socks")\n',
    )
    tunnel = socks_tunnel(ssh)
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnel.run)
        assert tunnel.up
        nursery.cancel_scope.cancel()
    assert not tunnel.up
    [(pid, _)] = starts(tmp_path)
    assert not exists(pid)
    deadline = time.monotonic() + 2
    while running(int(child.read_text())):  # orphaned: reaped by init, not by us
        assert time.monotonic() < deadline, "ssh's child survived"
        await trio.sleep(0.02)


async def test_missing_ssh_binary_is_retried_and_logged(tmp_path, caplog):
    kinds = []
    tunnel = socks_tunnel(str(tmp_path / "no-such-ssh"), on_restart=kinds.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(tunnel.run)
        with trio.fail_after(5):
            while len(kinds) < 2:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert set(kinds) == {"spawn-failed"}
    assert "cannot run " + str(tmp_path / "no-such-ssh") + ": No such file or directory" in restart_messages(caplog)[0]


async def test_what_ssh_said_leaves_out_its_known_hosts_notice():
    """accept-new's first-connection notice is printed before the real reason, and would push it out."""
    stderr = trio.testing.MemoryReceiveStream()
    stderr.put_data(
        b"Warning: Permanently added '[10.0.0.1]:2223' (ED25519) to the list of known hosts.\r\n"
        b"channel 1: open failed: connect failed: open failed\r\n\r\n"
    )
    stderr.put_eof()
    tail = _Tail()
    await tail.collect(stderr)
    assert tail.last_lines() == "channel 1: open failed: connect failed: open failed"
