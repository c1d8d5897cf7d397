"""SQLite's writer lock across processes (`<db>-writer.lock`, server/storage/sqlite.py): workers take
turns writing through it instead of SQLite's sleeping busy handler. What a user relies on: a write
waits for another process's write and then lands; a lock held too long is a 503 that says so, not a
hang; a process that dies holding it, or a request cancelled while waiting for it, does not keep it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.errors import Unavailable
from server.storage.sqlite import SQLiteStorage

HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
mode = fcntl.LOCK_EX | (fcntl.LOCK_NB if sys.argv[2] == "try" else 0)
try:
    fcntl.flock(fd, mode)
except BlockingIOError:
    print("busy", flush=True)
    sys.exit(3)
print("held", flush=True)
sys.stdin.readline()            # hold it until told (or killed)
"""


class Holder:
    """Another process holding (or trying to take) the writer lock."""

    def __init__(self, lock: Path, how: str = "wait") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), how], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.said = self.proc.stdout.readline().strip()

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStorage(str(tmp_path / "skm.db"))
    await s.open()
    await s.execute("CREATE TABLE w (n INTEGER NOT NULL)")
    holders: list[Holder] = []
    s.holders = holders             # type: ignore[attr-defined]
    yield s
    for h in holders:
        h.kill()
    await s.close()


def hold(store: SQLiteStorage, how: str = "wait") -> Holder:
    h = Holder(Path(f"{store.path}-writer.lock"), how)
    store.holders.append(h)         # type: ignore[attr-defined]
    return h


def insert(n: int):
    def fn(con) -> int:
        con.execute("INSERT INTO w (n) VALUES (?)", (n,))
        return n
    return fn


async def rows(store: SQLiteStorage) -> list[int]:
    return [r["n"] for r in await store.fetchall("SELECT n FROM w ORDER BY n")]


async def test_the_lock_file_is_private_and_beside_the_database(store: SQLiteStorage):
    lock = Path(f"{store.path}-writer.lock")
    assert lock.exists() and (lock.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("way", ["transaction", "sync_transaction"])
async def test_a_write_waits_for_another_process_then_lands(store: SQLiteStorage, way: str):
    other = hold(store)
    assert other.said == "held"

    async def write() -> None:
        if way == "sync_transaction":
            await store.sync_transaction(insert(1))
        else:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO w (n) VALUES (?)", 1)
    task = asyncio.ensure_future(write())
    await asyncio.sleep(0.3)                 # (a negative check: it must still be waiting)
    assert not task.done()
    assert await rows(store) == []
    other.release()
    await asyncio.wait_for(task, 10)
    assert await rows(store) == [1]
    # ... and it let the lock go: another process takes it at once.
    assert hold(store, "try").said == "held"


@pytest.mark.parametrize("way", ["transaction", "sync_transaction"])
async def test_a_lock_held_too_long_is_unavailable_not_a_hang(store: SQLiteStorage, way: str):
    store.lock_timeout = 0.3
    hold(store)
    with pytest.raises(Unavailable) as e:
        if way == "sync_transaction":
            await asyncio.wait_for(store.sync_transaction(insert(1)), 10)
        else:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO w (n) VALUES (?)", 1)
    assert e.value.status == 503 and "writer lock" in e.value.detail and "try again" in e.value.detail
    store.holders[0].release()               # type: ignore[attr-defined]
    assert await rows(store) == []


async def test_a_process_killed_holding_the_lock_frees_it(store: SQLiteStorage):
    other = hold(store)
    assert other.said == "held"
    other.kill()
    assert await asyncio.wait_for(store.sync_transaction(insert(2)), 10) == 2
    assert await rows(store) == [2]


async def test_a_cancelled_wait_does_not_keep_the_lock(store: SQLiteStorage):
    other = hold(store)

    async def write() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO w (n) VALUES (?)", 3)
    task = asyncio.ensure_future(write())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    other.release()
    # The thread that was waiting takes the lock once it is free, then lets it go: another process gets it.
    deadline = asyncio.get_running_loop().time() + 10
    while (h := hold(store, "try")).said != "held":
        assert asyncio.get_running_loop().time() < deadline, "the cancelled wait kept the writer lock"
        await asyncio.sleep(0.05)
    h.release()
    assert await rows(store) == []
    await store.sync_transaction(insert(4))       # and this process can still write
    assert await rows(store) == [4]


async def test_a_failed_write_rolls_back_and_lets_the_lock_go(store: SQLiteStorage):
    def fail(con) -> None:
        con.execute("INSERT INTO w (n) VALUES (?)", (5,))
        raise ValueError("the batch failed")
    with pytest.raises(ValueError):
        await store.sync_transaction(fail)
    assert await rows(store) == []
    assert hold(store, "try").said == "held"
    assert os.path.exists(store.path)




async def test_what_the_loop_writes_is_checkpointed_into_the_database_file(store: SQLiteStorage, tmp_path: Path):
    """`sync_transaction` writes on the event loop's thread with a connection that never checkpoints on
    commit (that would sync the file on the loop); a reader does it in its thread instead, or the WAL
    would only grow. Seen in the database file alone, without its WAL."""
    import shutil
    import sqlite3

    def in_main_file() -> list[int]:
        copy = tmp_path / "main-file-only.db"
        shutil.copyfile(store.path, copy)
        con = sqlite3.connect(copy)
        try:
            return [r[0] for r in con.execute("SELECT n FROM w ORDER BY n")]
        except sqlite3.OperationalError:         # the table itself still only in the WAL
            return []
        finally:
            con.close()
            copy.unlink()

    store.checkpoint_interval = 3600.0
    await store.sync_transaction(insert(0))      # the first commit checkpoints; then not for an hour
    await store._checkpointing
    first = store._checkpointing
    for n in range(1, 20):
        await store.sync_transaction(insert(n))
    assert store._checkpointing is first
    assert in_main_file() == [0]
    store._next_checkpoint = 0.0                 # the hour is up
    await store.sync_transaction(insert(20))
    assert store._checkpointing is not first
    await store._checkpointing
    assert in_main_file() == list(range(21))
