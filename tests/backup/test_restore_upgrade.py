"""A backup made at an older schema restores into this one: rows go into the backup's schema, then
the newer migrations run over them (as an upgrade would); a newer schema's backup is refused."""
from __future__ import annotations

import os

import pytest

from server.backup.format import InvalidBackup
from server.backup.restore import restore
from server.backup.schedule import backup_to_file
from server.barrier.barrier import Barrier
from server.storage.base import open_storage
from server.storage.migrations import MIGRATIONS


async def test_an_older_schema_backup_restores_and_is_migrated(storage_url, tmp_path):
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    old = open_storage(f"sqlite:///{tmp_path / 'old.db'}")
    old.migrations = MIGRATIONS[:-1]            # the store as the previous release left it
    await old.open()
    try:
        await old.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?)",
                          "AppKey0000000001", "legacy", "2025-01-01T00:00:00.000000Z")
        backup = tmp_path / "old.skmbak"
        summary = await backup_to_file(old, barrier, backup)
    finally:
        await old.close()
    assert summary.schema_version == MIGRATIONS[-2][0]
    await restore(backup, barrier, storage_url)
    target = open_storage(storage_url)
    await target.open()
    try:
        assert await target.schema_versions() == [v for v, _ in MIGRATIONS]
        assert await target.fetchval("SELECT name FROM projects WHERE appkey = ?", "AppKey0000000001") == "legacy"
        # The id sequence continues after the restored row on either backend.
        await target.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?)",
                             "AppKey0000000002", "new", "2025-01-02T00:00:00.000000Z")
        ids = [r["id"] for r in await target.fetchall("SELECT id FROM projects ORDER BY id")]
        assert len(set(ids)) == 2
    finally:
        await target.close()


async def test_a_backup_from_a_newer_schema_is_refused(tmp_path, monkeypatch):
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    newer = MIGRATIONS + [(9999, ["CREATE TABLE from_the_future (id INTEGER PRIMARY KEY)"])]
    src = open_storage(f"sqlite:///{tmp_path / 'new.db'}")
    src.migrations = newer
    await src.open()
    try:
        await backup_to_file(src, barrier, tmp_path / "new.skmbak")
    finally:
        await src.close()
    with pytest.raises(InvalidBackup, match="schema version.*9999.*does not know"):
        await restore(tmp_path / "new.skmbak", barrier, f"sqlite:///{tmp_path / 'target' / 'skm.db'}")
    assert not (tmp_path / "target" / "skm.db").exists()
