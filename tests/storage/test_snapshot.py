"""Storage.snapshot(): one consistent read-only view while writers go on (what a backup reads through)."""
from __future__ import annotations

import pytest

from server.storage.base import Column


async def _project(storage, n: int) -> None:
    await storage.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?)",
                          f"AppKey{n:010d}", f"p{n}", "2025-01-01T00:00:00.000000Z")


async def test_a_snapshot_sees_one_moment_and_does_not_block_writers(storage):
    for n in range(5):
        await _project(storage, n)
    async with storage.snapshot() as snap:
        assert await snap.fetchval("SELECT COUNT(*) AS n FROM projects") == 5
        # Writers are not blocked by the open snapshot, and it does not see what they commit.
        for n in range(5, 8):
            await _project(storage, n)
        await storage.execute("DELETE FROM projects WHERE name = ?", "p0")
        assert await storage.fetchval("SELECT COUNT(*) AS n FROM projects") == 7
        assert await snap.fetchval("SELECT COUNT(*) AS n FROM projects") == 5
        names = []
        async for rows in snap.stream("SELECT name FROM projects ORDER BY id", batch=2):
            assert 1 <= len(rows) <= 2 and isinstance(rows[0], tuple)
            names += [r[0] for r in rows]
        assert names == [f"p{n}" for n in range(5)]
        with pytest.raises(RuntimeError, match="read-only"):
            await snap.execute("DELETE FROM projects")
    assert await storage.fetchval("SELECT COUNT(*) AS n FROM projects") == 7


async def test_a_snapshot_describes_the_schema(storage):
    await _project(storage, 1)
    async with storage.snapshot() as snap:
        tables = await snap.tables()
        assert {"projects", "keys", "key_versions", "audit_log", "audit_head"} <= set(tables)
        assert "schema_version" not in tables and not any(t.startswith("sqlite_") for t in tables)
        cols = await snap.columns("key_versions")
        assert [c.name for c in cols][:4] == ["key_id", "version", "status", "material_sealed"]
        assert Column("material_sealed", True) in cols and Column("status", False) in cols
        seqs = await snap.sequences()
        assert seqs.get("projects", 0) >= 1
