"""SQLite backend (aiosqlite, WAL): the embedded default.

One writer connection guarded by a lock (SQLite has one writer anyway) and a
small pool of reader connections, which WAL lets run beside the writer. The audit
log's batches are written by a connection of their own on the event loop's thread
(`sync_transaction`), under the same lock.

Several processes on one file (`workers = N`) take turns writing through a file lock,
`<db>-writer.lock` (flock), held around each write transaction. SQLite's own locking stays what
keeps the file correct; the flock is there because SQLite's busy handler waits for the write lock
by sleeping in steps of up to 100 ms: two workers committing audit batches took turns that way and
used one core between them (bench/README.md). A writer waiting on the flock tries again after at
most 2 ms, and gives up after the busy timeout as SQLite would (503). The kernel drops the flock of
a process that dies.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import aiosqlite

from server import logs
from server.errors import ConfigError, Unavailable
from server.storage.base import Column, Executor, Row, Snapshot, Storage
from server.storage.migrations import render

T = TypeVar("T")
BUSY_TIMEOUT_S = 5.0              # PRAGMA busy_timeout, and the writer lock's wait
CHECKPOINT_INTERVAL_S = 1.0       # the inline audit connection's WAL checkpoints (see _after_inline_commit)
_BUSY = object()
log = logs.get("skm.storage")


def _dict_factory(cursor: sqlite3.Cursor, row: tuple) -> Row:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class _Conn(Executor):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self.conn.execute(sql, args) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self.conn.execute(sql, args) as cur:
            return list(await cur.fetchall())

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.conn.execute(sql, args) as cur:
            return cur.rowcount

    async def insert_rows(self, table: str, columns, rows) -> None:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        await self.conn.executemany(sql, rows)

    async def insert_batch(self, table: str, columns, rows) -> None:
        # One statement whatever the number of rows. Python's sqlite3 keeps the last 128 statements
        # compiled per connection with no bound on their size: a multi-row INSERT per batch size
        # (1..256 audit records) held up to ~1 MiB each, the key server's RSS growth in the soak.
        await self.insert_rows(table, columns, rows)


class _Snapshot(_Conn, Snapshot):
    dialect = "sqlite"

    async def execute(self, sql: str, *args: Any) -> int:
        return await Snapshot.execute(self, sql, *args)

    async def stream(self, sql: str, *args: Any, batch: int = 1000) -> AsyncIterator[list[tuple]]:
        cur = await self.conn.execute(sql, args)
        cur.row_factory = None          # plain tuples: the backup encodes them positionally
        try:
            while True:
                rows = await cur.fetchmany(batch)
                if not rows:
                    return
                yield rows
        finally:
            await cur.close()

    async def tables(self) -> list[str]:
        rows = await self.fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                                   "AND name <> 'schema_version' ORDER BY name")
        return [r["name"] for r in rows]

    async def columns(self, table: str) -> list[Column]:
        rows = await self.fetchall("SELECT name, type FROM pragma_table_info(?) ORDER BY cid", table)
        return [Column(r["name"], (r["type"] or "").upper() == "BLOB") for r in rows]

    async def sequences(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT name, seq FROM sqlite_sequence ORDER BY name")
        return {r["name"]: int(r["seq"]) for r in rows}


class SQLiteStorage(Storage):
    dialect = "sqlite"

    def __init__(self, path: str, readers: int = 2) -> None:
        self.path = path
        self._n_readers = readers
        self._writer: aiosqlite.Connection | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        self._write_lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self.lock_timeout = BUSY_TIMEOUT_S
        self._inline: sqlite3.Connection | None = None     # sync_transaction's, on the loop's thread
        self._checkpointing: asyncio.Future | None = None
        self._next_checkpoint = 0.0
        self.checkpoint_interval = CHECKPOINT_INTERVAL_S

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = _dict_factory
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            # A deleted record's bytes are zeroed, not left in the file (nor in a backup's page copy,
            # server/backup/snapshot.py): SQLite's build default on Debian, said here so no build decides.
            await conn.execute("PRAGMA secure_delete=ON")
            await conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            # Not a database (or unreadable): close it here, or its thread outlives close() and holds the
            # process open at exit.
            await conn.close()
            raise
        self._all.append(conn)
        return conn

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fresh = not os.path.exists(self.path)
        try:
            self._writer = await self._connect()
        except sqlite3.DatabaseError as e:
            # Fail closed with what to do: the file is damaged or was replaced; nothing is written to it.
            raise ConfigError(f"{self.path} is not a usable SQLite database ({e}): it was damaged or replaced; "
                              "restore the store from a backup (`skm backup restore FILE --data-dir DIR`)") from None
        if fresh:
            os.chmod(self.path, 0o600)
        self._lock_fd = os.open(f"{self.path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._lock_fd, 0o600)
        await self._migrate()
        for _ in range(self._n_readers):
            self._readers.put_nowait(await self._connect())
        self._inline = _connect_inline(self.path)

    async def _migrate(self) -> None:
        w = _Conn(self._writer)
        await w.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        # Every migration not yet recorded, in list order: a lower number merged after a higher one
        # was applied (parallel branches) still runs.
        applied = {r["version"] for r in await w.fetchall("SELECT version FROM schema_version")}
        for version, statements in self.migrations:
            if version in applied:
                continue
            await w.execute("BEGIN IMMEDIATE")
            try:
                for stmt in statements:
                    await w.execute(render(stmt, self.dialect))
                await w.execute("INSERT INTO schema_version (version) VALUES (?)", version)
                await w.execute("COMMIT")
            except BaseException:
                await w.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        if self._checkpointing is not None and not self._checkpointing.done():
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        for c in self._all:
            await c.close()
        self._all.clear()
        self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Conn]:
        conn = await self._readers.get()
        try:
            yield _Conn(conn)
        finally:
            self._readers.put_nowait(conn)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self._reader() as r:
            return await r.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self._reader() as r:
            return await r.fetchall(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        # Its own connection: a long backup must not hold one of the pooled readers.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = _dict_factory
        try:
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute("PRAGMA query_only=ON")
            await conn.execute("BEGIN")
            snap = _Snapshot(conn)
            # The read transaction (and so the WAL snapshot) starts at the first read: take it now.
            await snap.fetchone("SELECT COUNT(*) AS n FROM sqlite_master")
            yield snap
        finally:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            await conn.close()

    async def set_sequences(self, tx: Executor, sequences: dict[str, int]) -> None:
        for table, seq in sequences.items():
            # AUTOINCREMENT keeps the highest id ever used here; inserting explicit ids already raised it.
            n = await tx.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", seq, table)
            if not n:
                await tx.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", table, seq)

    async def sync_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(connection)` inside BEGIN IMMEDIATE ... COMMIT, run whole on the calling (event-loop)
        thread with a connection of its own, when the writer lock is free. While another process holds
        the lock this polls it without blocking the loop, as `_take_writer_lock` does.

        Why not the writer connection's thread: that thread and the event loop then take turns on the
        GIL from two cores, and the hand-offs cost more than the writing (a secret read, one worker on
        2 cores: 265-326 µs of CPU against 190-217 µs with both threads on one core; the same with the
        writer thread alone on the other core). A batch's transaction is a few hundred microseconds of
        SQLite work and never waits here: the lock is taken only if free, and the connection's busy
        timeout is 0."""
        async with self._write_lock:
            con = self._inline
            assert con is not None, "storage not open"
            pause, deadline = 0.0002, None
            while True:
                out = self._inline_once(con, fn)
                if out is not _BUSY:
                    self._after_inline_commit()
                    return out                          # type: ignore[return-value]
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.lock_timeout
                elif now >= deadline:
                    raise _busy(self.lock_timeout)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.002)

    def _inline_once(self, con: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T | object:
        """One try: `_BUSY` (nothing done) when another process holds the writer lock or SQLite's own."""
        fd = self._lock_fd
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _BUSY
        try:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return _BUSY        # a writer that does not take the flock (an older build, the sqlite3 shell)
                raise
            try:
                out = fn(con)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:          # (also when COMMIT itself failed: the next BEGIN must work)
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                raise
            return out
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _after_inline_commit(self) -> None:
        """The inline connection never checkpoints on commit (a checkpoint syncs the database file: a stall
        of the loop): a reader connection checkpoints the WAL in its thread, PASSIVE (it waits for no
        reader or writer), at most every `checkpoint_interval` seconds while audit batches are written."""
        now = time.monotonic()
        if now < self._next_checkpoint or (self._checkpointing is not None and not self._checkpointing.done()):
            return
        self._next_checkpoint = now + self.checkpoint_interval
        self._checkpointing = asyncio.ensure_future(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            async with self._reader() as r:
                await r.fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as e:          # the next commit tries again; SQLite's own checkpoints still run
            log.warning("wal_checkpoint_failed", error_type=type(e).__name__)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._write_lock:
            w = _Conn(self._writer)
            await self._take_lock()
            try:
                await w.execute("BEGIN IMMEDIATE")
                try:
                    yield w
                except BaseException:
                    await w.execute("ROLLBACK")
                    raise
                else:
                    await w.execute("COMMIT")
            finally:
                if self._lock_fd is not None:      # (unlocking never blocks; COMMIT has returned)
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _take_lock(self) -> None:
        """The writer lock: at once when it is free, else waited for on the connection's thread."""
        fd = self._lock_fd
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        assert self._writer is not None
        taking = asyncio.ensure_future(self._writer._execute(_take_writer_lock, fd, self.lock_timeout))
        try:
            await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The thread may still take it after we stopped waiting: let it go again then.
            taking.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() is not None else fcntl.flock(fd, fcntl.LOCK_UN))
            raise


def _take_writer_lock(fd: int, timeout: float) -> None:
    """The process-shared writer lock (blocking: the connection's thread). Tried again after 0.2 ms,
    doubling to 2 ms: a wait is usually one other commit. Unavailable after `timeout` seconds."""
    pause, deadline = 0.0002, None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        elif now >= deadline:
            raise _busy(timeout)
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def _busy(timeout: float) -> Unavailable:
    return Unavailable(f"the database is busy: another process has held its writer lock for over {timeout:g} s; "
                       "try again (a process stuck mid-write holds it until it exits)")


def _connect_inline(path: str) -> sqlite3.Connection:
    """The connection `sync_transaction` writes with on the event loop's thread (see there)."""
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        con.row_factory = _dict_factory
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA secure_delete=ON")
        con.execute("PRAGMA busy_timeout=0")         # never wait inside SQLite on the loop's thread
        con.execute("PRAGMA wal_autocheckpoint=0")   # checkpoints: `_after_inline_commit`
    except BaseException:
        con.close()
        raise
    return con
