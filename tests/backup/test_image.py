"""Format 2's payload is a SQLite store: from either backend the image has the schema a SQLite store
has (tables, indexes, seeded rows replaced by the source's), restores into SQLite as the database
file itself and into PostgreSQL with its keys, indexes and foreign keys made again after the load."""
from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from server.backup.image import SHM, RowsImage
from server.backup.restore import restore, verify_file
from server.backup.schedule import backup_to_file
from server.barrier.barrier import Barrier
from server.errors import ConfigError
from server.storage.factory import open_storage
from server.storage.migrations import MIGRATIONS


def _schema(path) -> list[tuple[str, str]]:
    con = sqlite3.connect(path)
    try:
        return sorted(con.execute("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'index') "
                                  "AND name NOT LIKE 'sqlite_%'").fetchall())
    finally:
        con.close()


async def _fill(storage) -> None:
    await storage.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?)",
                          "AppKeyImg", "img", "2025-01-01T00:00:00.000000Z")
    pid = await storage.fetchval("SELECT id FROM projects WHERE appkey = ?", "AppKeyImg")
    await storage.execute("INSERT INTO keystores (project_id, name, created_by, created_at, updated_by, updated_at) "
                          "VALUES (?, ?, ?, ?, ?, ?)", pid, "ks", "t", "2025-01-01", "t", "2025-01-01")


async def test_either_backend_backs_up_to_an_image_that_restores_into_sqlite(storage_url, tmp_path):
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    src = open_storage(storage_url)
    await src.open()
    shm_before = set(SHM.glob("skm-backup-*"))
    try:
        await _fill(src)
        backup = tmp_path / "b.skmbak"
        summary = await backup_to_file(src, barrier, backup)
        assert summary.backend == src.dialect
    finally:
        await src.close()
    # The scratch image is gone, in memory or beside the database.
    assert set(SHM.glob("skm-backup-*")) <= shm_before and not list(tmp_path.glob(".skm-backup-*"))
    assert (await verify_file(backup, barrier)).manifest.tables
    target = tmp_path / "restored" / "skm.db"
    report = await restore(backup, barrier, f"sqlite:///{target}")
    assert report.audit["ok"]
    # The same tables and indexes as a store the SQLite backend made itself; nothing left beside it.
    fresh = open_storage(f"sqlite:///{tmp_path / 'fresh' / 'skm.db'}")
    await fresh.open()
    await fresh.close()
    assert _schema(target) == _schema(tmp_path / "fresh" / "skm.db")
    assert sorted(p.name for p in target.parent.iterdir()) == ["skm.db"]
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    restored = open_storage(f"sqlite:///{target}")
    await restored.open()
    try:
        assert await restored.fetchval("SELECT name FROM keystores") == "ks"
        assert await restored.fetchval("SELECT COUNT(*) AS n FROM audit_head") == 1
    finally:
        await restored.close()


async def test_a_restore_into_postgresql_keeps_its_keys_indexes_and_foreign_keys(pg_url, tmp_path):
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    src = open_storage(f"sqlite:///{tmp_path / 'src' / 'skm.db'}")
    await src.open()
    try:
        await _fill(src)
        backup = tmp_path / "b.skmbak"
        await backup_to_file(src, barrier, backup)
    finally:
        await src.close()

    async def catalog(url: str) -> tuple[list, list]:
        st = open_storage(url)
        await st.open()
        try:
            cons = await st.fetchall("SELECT conrelid::regclass::text AS t, conname AS name, contype::text AS kind, "
                                     "pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE connamespace = "
                                     "current_schema()::regnamespace ORDER BY 1, 2")
            idx = await st.fetchall("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                                    "ORDER BY 1")
            return cons, idx
        finally:
            await st.close()

    before = await catalog(pg_url)          # a store migrated from scratch: what must be there after
    assert before[0] and before[1]
    # An empty store (the migrations' own rows only) is a valid target; the catalog must come back whole.
    await restore(backup, barrier, pg_url)
    assert await catalog(pg_url) == before
    st = open_storage(pg_url)
    await st.open()
    try:
        assert await st.fetchval("SELECT name FROM keystores") == "ks"
    finally:
        await st.close()


async def test_a_target_that_is_not_a_database_is_refused_and_left_alone(tmp_path):
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    src = open_storage(f"sqlite:///{tmp_path / 'src' / 'skm.db'}")
    await src.open()
    try:
        backup = tmp_path / "b.skmbak"
        await backup_to_file(src, barrier, backup)
    finally:
        await src.close()
    target = tmp_path / "t" / "skm.db"
    target.parent.mkdir()
    target.write_bytes(b"not a database, but someone's file" * 200)
    with pytest.raises(ConfigError, match="cannot open the target"):
        await restore(backup, barrier, f"sqlite:///{target}")
    assert target.read_bytes() == b"not a database, but someone's file" * 200
    assert sorted(p.name for p in target.parent.iterdir()) == ["skm.db"]


def test_closing_a_rows_image_waits_for_a_call_still_running_in_another_thread(tmp_path):
    """A backup of PostgreSQL cancelled while its image's indexes are being built closes the image from
    another thread (the build's thread cannot be stopped). The close waits for the build rather than
    closing the connection under a running statement, which crashed the whole process."""
    dest = tmp_path / "image.db"
    img = RowsImage(dest, [v for v, _ in MIGRATIONS])
    img.insert("projects", ["appkey", "name", "created_at"], [(f"key{i}", f"p{i}", "2025-01-01") for i in range(300)])
    building, go = threading.Event(), threading.Event()

    def hold() -> int:
        building.set()
        go.wait(10)
        return 0
    img.con.set_progress_handler(hold, 50)
    finisher = threading.Thread(target=img.finish)
    finisher.start()
    assert building.wait(10)
    closer = threading.Thread(target=img.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close went ahead while finish was running on the same connection"
    go.set()
    finisher.join(10)
    closer.join(10)
    assert not finisher.is_alive() and not closer.is_alive()
    con = sqlite3.connect(dest)
    try:
        assert con.execute("SELECT COUNT(*) FROM projects").fetchone()[0] == 300
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
