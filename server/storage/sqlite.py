"""SQLite backend (aiosqlite, WAL): the embedded default.

One writer connection guarded by a lock (SQLite has one writer anyway) and a
small pool of reader connections, which WAL lets run beside the writer.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite

from server.errors import ConfigError
from server.storage.base import Column, Executor, Row, Snapshot, Storage
from server.storage.migrations import render


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

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = _dict_factory
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
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
        await self._migrate()
        for _ in range(self._n_readers):
            self._readers.put_nowait(await self._connect())

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
        for c in self._all:
            await c.close()
        self._all.clear()
        self._writer = None

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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._write_lock:
            w = _Conn(self._writer)
            await w.execute("BEGIN IMMEDIATE")
            try:
                yield w
            except BaseException:
                await w.execute("ROLLBACK")
                raise
            else:
                await w.execute("COMMIT")
