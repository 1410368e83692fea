"""The fake-IP store on disk: where it lives, how it is read, written atomically, and kept while serving."""

import errno
import ipaddress
import logging
import os
import stat
import time

import pytest
import trio

from relay.config import ConfigError
from relay.dns import fakeip_store
from relay.dns.fakeip import FakeIps
from relay.dns.fakeip_store import STORE_NAME, keep_saved, load, prepare, write
from relay.dns.message import parse_query
from tests import root
from tests.dns.support import query


def pool() -> FakeIps:
    return FakeIps([ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00::/18")], [])


def asked(fake_ips: FakeIps, *names: str) -> FakeIps:
    for name in names:
        fake_ips.answer(parse_query(query(name)))
    return fake_ips


def test_the_state_dir_is_created_for_us_alone(tmp_path):
    directory = tmp_path / "var" / "lib" / "relay"
    prepare(str(directory), None)
    prepare(str(directory), None)  # already there: fine
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_state_dir_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match=f"--state-dir {tmp_path}/file/relay: Not a directory"):
        prepare(str(tmp_path / "file" / "relay"), None)


def test_the_state_dir_is_given_to_the_user_the_relay_becomes(tmp_path):
    root.require_root("chown needs root")
    prepare(str(tmp_path / "state"), "nobody")
    assert (tmp_path / "state").stat().st_uid == 65534
    with pytest.raises(ConfigError, match="no such user"):
        prepare(str(tmp_path / "state"), "no-such-user-here")


def test_a_store_written_is_read_back_and_nothing_else_is_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    before = asked(pool(), "a.example", "b.example")
    write(str(tmp_path), before.dump())
    after = pool()
    load(after, str(tmp_path))
    assert after.name_for("198.18.0.2") == "b.example"
    assert os.listdir(tmp_path) == [STORE_NAME]
    assert stat.S_IMODE((tmp_path / STORE_NAME).stat().st_mode) == 0o600  # it lists what the LAN looked up
    assert "fake-ip: 2 names restored" in caplog.text


def test_no_store_yet_is_an_empty_pool_without_a_word(tmp_path, caplog):
    fake_ips = pool()
    load(fake_ips, str(tmp_path))
    assert fake_ips.in_use() == {4: 0, 6: 0} and caplog.text == ""


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"garbage", lambda data: b""])
def test_a_damaged_store_is_an_empty_pool_and_a_warning(tmp_path, caplog, damage):
    (tmp_path / STORE_NAME).write_bytes(damage(asked(pool(), "a.example").dump()))
    fake_ips = pool()
    load(fake_ips, str(tmp_path))
    assert fake_ips.in_use() == {4: 0, 6: 0}
    assert f"fake-ip store {tmp_path}/{STORE_NAME} is damaged" in caplog.text


def test_a_failed_write_leaves_the_old_store_and_no_temporary_file(tmp_path, monkeypatch):
    write(str(tmp_path), asked(pool(), "old.example").dump())
    old = (tmp_path / STORE_NAME).read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(str(tmp_path), asked(pool(), "new.example").dump())
    assert (tmp_path / STORE_NAME).read_bytes() == old and os.listdir(tmp_path) == [STORE_NAME]


async def test_the_store_is_written_after_a_change_at_most_once_an_interval_and_at_exit(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(fakeip_store, "write", lambda directory, data: writes.append(data))
    fake_ips = pool()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_saved, fake_ips, str(tmp_path), 0.2)
        await trio.sleep(0.5)
        assert writes == []  # nothing changed
        asked(fake_ips, "a.example", "b.example")
        await trio.sleep(0.3)
        assert len(writes) == 1
        asked(fake_ips, "a.example")  # no new name: nothing to write
        await trio.sleep(0.3)
        assert len(writes) == 1
        asked(fake_ips, "c.example")
        nursery.cancel_scope.cancel()
    assert len(writes) == 2  # at exit
    restored = pool()
    restored.load(writes[-1])
    assert restored.name_for("198.18.0.3") == "c.example"


async def test_a_write_that_fails_is_tried_again_and_warned_of_once(tmp_path, monkeypatch, caplog):
    attempts = []

    def failing(directory, data):
        attempts.append(data)
        if len(attempts) < 3:
            raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fakeip_store, "write", failing)
    fake_ips = asked(pool(), "a.example")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_saved, fake_ips, str(tmp_path), 0.1)
        await trio.sleep(0.45)
        nursery.cancel_scope.cancel()
    assert len(attempts) == 3 and fake_ips.changes == 0
    assert caplog.text.count("fake-ip store not written") == 1


async def test_the_store_is_encoded_and_written_apart_from_the_event_loop(tmp_path, monkeypatch):
    """A full pool takes a second or so to encode: DNS answers must not wait for it."""
    monkeypatch.setattr(fakeip_store, "encode", lambda snapshot: time.sleep(0.5) or b"")
    fake_ips = asked(pool(), "a.example")
    longest = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_saved, fake_ips, str(tmp_path), 0.05)
        for _ in range(40):
            before = time.monotonic()
            await trio.sleep(0.01)
            longest = max(longest, time.monotonic() - before)
        nursery.cancel_scope.cancel()
    assert longest < 0.2
