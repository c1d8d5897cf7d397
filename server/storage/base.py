"""The storage interface every backend implements.

SQL above this layer is written once in a portable subset: `?` placeholders,
`RETURNING`, `ON CONFLICT`; each backend translates placeholders. Migrations
use `{serial}`, `{blob}` and `{bigint}` tokens the backend fills in.
"""
from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from typing import Any, Sequence

Row = dict[str, Any]


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


class Storage(Executor):
    dialect: str = "abstract"

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
