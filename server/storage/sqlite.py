"""SQLite backend (aiosqlite, WAL): the embedded default.

One writer connection guarded by a lock (SQLite has one writer anyway) and a
small pool of reader connections, which WAL lets run beside the writer.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite

from server.storage.base import Executor, Row, Storage
from server.storage.migrations import MIGRATIONS, render


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
        conn.row_factory = _dict_factory
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        self._all.append(conn)
        return conn

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fresh = not os.path.exists(self.path)
        self._writer = await self._connect()
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
        for version, statements in MIGRATIONS:
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
