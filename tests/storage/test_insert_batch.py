"""`Executor.insert_batch` (the audit writer's group commit) on both backends: every row, in order,
inside the caller's transaction, and nothing of the batch when that transaction fails."""
from __future__ import annotations

import pytest

from server.storage.base import Storage
from server.storage.migrations import render
from tests.support.postgres import storage, storage_url  # noqa: F401

TABLE = "CREATE TABLE batch_rows (id {serial_pk}, n INTEGER NOT NULL UNIQUE, label TEXT)"


async def test_rows_of_any_batch_size_land_in_order(storage: Storage):  # noqa: F811
    await storage.execute(render(TABLE, storage.dialect))
    n = 0
    for size in (1, 2, 7, 64, 3, 256):
        rows = [(n + i, f"row {n + i}") for i in range(size)]
        async with storage.transaction() as tx:
            await tx.insert_batch("batch_rows", ("n", "label"), rows)
        n += size
    async with storage.transaction() as tx:
        await tx.insert_batch("batch_rows", ("n", "label"), [])        # nothing to write is not an error
    got = await storage.fetchall("SELECT n, label FROM batch_rows ORDER BY id")
    assert [(r["n"], r["label"]) for r in got] == [(i, f"row {i}") for i in range(n)]


async def test_a_failed_batch_leaves_nothing(storage: Storage):  # noqa: F811
    await storage.execute(render(TABLE, storage.dialect))
    await storage.execute("INSERT INTO batch_rows (n, label) VALUES (?, ?)", 5, "kept")
    with pytest.raises(Exception) as e:
        async with storage.transaction() as tx:
            await tx.insert_batch("batch_rows", ("n", "label"), [(i, "new") for i in range(10)])   # 5 is taken
    assert "unique" in str(e.value).lower() or "duplicate" in str(e.value).lower(), e.value
    got = await storage.fetchall("SELECT n, label FROM batch_rows")
    assert [(r["n"], r["label"]) for r in got] == [(5, "kept")]
