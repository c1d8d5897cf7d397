"""The storage interface every backend implements.

SQL above this layer is written once in a portable subset: `?` placeholders,
`RETURNING`, `ON CONFLICT`; each backend translates placeholders. Migrations
use `{serial}`, `{blob}` and `{bigint}` tokens the backend fills in.
"""
from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from server.storage.migrations import MIGRATIONS

Row = dict[str, Any]


@dataclass(frozen=True)
class Column:
    name: str
    blob: bool          # BLOB / BYTEA: values are bytes


class Executor(abc.ABC):
    """What a statement runs on: the store itself or one open transaction."""

    @abc.abstractmethod
    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    @abc.abstractmethod
    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchone(sql, *args)
        return None if row is None else next(iter(row.values()))

    async def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows into one table (a restore's bulk path; backends override with faster ones)."""
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        for r in rows:
            await self.execute(sql, *r)

    async def insert_batch(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert a few hundred rows at most inside the current transaction (the audit writer's group
        commit) in one round trip: here one multi-row INSERT, whose text differs with the number of rows
        (PostgreSQL: asyncpg caches at most 100 statements and none over 15 KiB). SQLite overrides it."""
        if not rows:
            return
        one = f"({', '.join('?' * len(columns))})"
        await self.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(rows))}",
                           *(v for r in rows for v in r))


class Snapshot(Executor):
    """One consistent, read-only view of the whole database (a backup reads through it).

    SQLite: a deferred transaction on its own connection (WAL: it sees the database as of its
    first read while writers go on). PostgreSQL: REPEATABLE READ READ ONLY on its own connection.
    """

    dialect: str = "abstract"

    async def execute(self, sql: str, *args: Any) -> int:
        raise RuntimeError("a snapshot is read-only")

    @abc.abstractmethod
    def stream(self, sql: str, *args: Any, batch: int = 1000) -> AsyncIterator[list[tuple]]:
        """The rows of a query as tuples, `batch` at a time, without holding them all in memory."""

    @abc.abstractmethod
    async def tables(self) -> list[str]:
        """The application's tables (not the backend's own, not schema_version)."""

    @abc.abstractmethod
    async def columns(self, table: str) -> list[Column]:
        """A table's columns in their declared order."""

    @abc.abstractmethod
    async def sequences(self) -> dict[str, int]:
        """Per table with a generated id: the last id handed out (never reused after a restore)."""


class Storage(Executor):
    dialect: str = "abstract"
    # The migrations open() applies; a restore narrows it to the ones its backup was made at.
    migrations: list[tuple[int, list[str]]] = MIGRATIONS

    def snapshot(self) -> AbstractAsyncContextManager[Snapshot]:
        """A consistent read-only view for as long as the block runs; writers are not blocked."""
        raise NotImplementedError(f"{self.dialect} storage has no snapshot")

    async def set_sequences(self, tx: Executor, sequences: dict[str, int]) -> None:
        """After a restore: generated ids continue after the highest the backup had handed out."""
        return None

    async def schema_versions(self) -> list[int]:
        rows = await self.fetchall("SELECT version FROM schema_version ORDER BY version")
        return [int(r["version"]) for r in rows]

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """A write transaction; commits on success, rolls back on any exception."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.transaction() as tx:
            for r in rows:
                await tx.execute(sql, *r)

    async def try_lock(self, name: str) -> bool:
        """Leadership for a background job; a single process always has it."""
        return True

    async def unlock(self, name: str) -> None:
        return None

    async def listen(self, channel: str, callback) -> None:
        """Cross-replica notifications; a single-process backend has none to hear."""
        return None

    async def notify(self, channel: str, payload: str) -> None:
        return None
