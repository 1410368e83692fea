"""The fake-IP pool's file in --state-dir: read at start, written while serving and at exit.

Clients keep a fake address in their own caches (TTL 1 notwithstanding: browsers, JVMs, long-lived connections
that reconnect), so a restarted relay must map it to the same name. Each write goes to a temporary file that is
synced and renamed over the store, then the directory is synced: a crash leaves the old store or the new, never half
of one. Writes happen only after a name got a new address, at most once per SAVE_INTERVAL (flash wears).
"""

import os
import pwd
import tempfile

import trio

from relay.config import ConfigError
from relay.dns.fakeip import MAX_STORE_BYTES, CorruptStore, FakeIps, encode
from relay.logs import RateLimited, log

STORE_NAME = "fake-ips"
SAVE_INTERVAL = 15.0  # seconds: what a crash may lose, and how often the flash is written at most


def prepare(directory: str, user: str | None) -> None:
    """Create --state-dir if missing (only we may read it: it lists the names the LAN looked up), and give it to
    --user, who will write the store once root is dropped. ConfigError with what stands in the way."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
    except KeyError:
        raise ConfigError(f"--user: no such user {user!r}") from None
    except OSError as exc:
        raise ConfigError(f"--state-dir {directory}: {exc.strerror}") from None


def load(fake_ips: FakeIps, directory: str) -> None:
    """Fill the pool from the store; a missing one leaves it empty, a damaged one too, with a warning."""
    path = os.path.join(directory, STORE_NAME)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_STORE_BYTES + 1)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("fake-ip store %s cannot be read (%s): starting with no names", path, exc.strerror)
        return
    try:
        left_out = fake_ips.load(data)
    except CorruptStore as exc:
        log.warning(
            "fake-ip store %s is damaged (%s): starting with no names; clients holding a fake address from before "
            "are reset until they ask again",
            path,
            exc,
        )
        return
    in_use = fake_ips.in_use()
    log.info("fake-ip: %d names restored from %s", sum(in_use.values()), path)
    if left_out:
        log.info("fake-ip: %d names left out, their address outside --fake-ip-range now", left_out)


def write(directory: str, data: bytes) -> None:
    """Replace the store with ``data`` atomically and durably; OSError if it could not be (the old one stays)."""
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{STORE_NAME}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, os.path.join(directory, STORE_NAME))
    except BaseException:
        os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)  # the rename itself
    finally:
        os.close(directory_fd)


def write_snapshot(directory: str, snapshot: list) -> None:
    write(directory, encode(snapshot))


async def keep_saved(fake_ips: FakeIps, directory: str, interval: float = SAVE_INTERVAL) -> None:
    """Until cancelled: write the store after each change, at most once per ``interval``; then a last time."""
    warnings = RateLimited(interval=600.0)
    try:
        while True:
            await trio.sleep(interval)
            if fake_ips.changes:
                try:  # encoded in the thread too: a second or so with a full pool
                    await trio.to_thread.run_sync(write_snapshot, directory, fake_ips.snapshot())
                except OSError as exc:
                    fake_ips.changes += 1  # written next time, or at exit
                    warnings.warning("fake-ip-store", f"fake-ip store not written in {directory}: {exc}")
    finally:
        if fake_ips.changes:  # at exit, cancelled: no more awaiting
            try:
                write(directory, fake_ips.dump())
            except OSError as exc:
                log.warning("fake-ip store not written in %s at exit: %s", directory, exc)
