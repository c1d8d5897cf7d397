"""How a backup copies a live SQLite store: page for page (SQLite's online backup) when the store's
connections delete securely, the copy's freelist zeroed; a rebuilt file (`VACUUM INTO`) otherwise.
Either way the sealed bytes of a deleted record do not travel in the backup file."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.backup.image import page_copy, scrub_freelist
from tests.support.backup import make_installation, run_skm


def _with_wal(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


@pytest.mark.parametrize("secure", [True, False], ids=["secure-delete", "no-secure-delete"])
async def test_a_deleted_records_sealed_bytes_are_not_in_the_backup(secure, tmp_path):
    inst = await make_installation(tmp_path / "site")
    h = await inst.start()
    try:
        storage = h.rt.storage
        if not secure:       # as a SQLite built without SECURE_DELETE leaves it: deleted cells keep their bytes
            async with storage.transaction() as tx:
                await tx.execute("PRAGMA secure_delete=OFF")
        async with storage.transaction() as tx:          # the premise, asked of the connection that deletes
            assert (int(await tx.fetchval("PRAGMA secure_delete")) == 1) is secure
        store = await h.keystore("doomed")
        ids = [(await h.key(store, "SECRET", f"s{i}", secretValue=f"value {i} " * 40))["keyId"] for i in range(30)]
        kept = (await h.key(store, "SECRET", "kept", secretValue="still here"))["keyId"]
        blobs = [bytes(await storage.fetchval("SELECT material_sealed AS b FROM key_versions WHERE key_id = ?", k))
                 for k in ids]
        async with storage.transaction() as tx:        # what the deletion purge does to the sealed material
            for k in ids:
                await tx.execute("DELETE FROM key_versions WHERE key_id = ?", k)
        live = _with_wal(Path(storage.path))
        if not secure:       # the premise: the live file still holds them, the backup must not copy it as is
            assert any(b in live for b in blobs)
        out = tmp_path / "b.skmbak"
        code, _o, err = await run_skm("backup", "create", "--out", str(out), env=inst.env(h))
        assert code == 0, err
    finally:
        await h.close()
    data = out.read_bytes()
    leaked = [i for i, b in enumerate(blobs) if b in data or b[4:36] in data]
    assert not leaked, f"sealed bytes of deleted records {leaked} are in the backup"
    target = tmp_path / "restored"
    code, _o, err = await run_skm("backup", "restore", str(out), "--config", str(inst.config_path),
                                  "--data-dir", str(target), env=inst.env())
    assert code == 0, err
    con = sqlite3.connect(target / "skm.db")
    try:
        assert con.execute("SELECT COUNT(*) FROM key_versions WHERE key_id = ?", (kept,)).fetchone()[0] == 1
        assert con.execute(f"SELECT COUNT(*) FROM key_versions WHERE key_id IN ({','.join('?' * len(ids))})",
                           ids).fetchone()[0] == 0
    finally:
        con.close()


def test_a_page_copy_zeroes_the_freelist_and_stays_a_sound_database(tmp_path):
    src = tmp_path / "live.db"
    marker = b"FREED-PAGE-MARKER-0123456789"
    con = sqlite3.connect(src, isolation_level=None)
    try:
        con.execute("PRAGMA secure_delete=OFF")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE kept (id INTEGER PRIMARY KEY, v BLOB)")
        con.execute("CREATE TABLE gone (id INTEGER PRIMARY KEY, v BLOB)")
        con.executemany("INSERT INTO kept (v) VALUES (?)", [(b"k" * 300,) for _ in range(50)])
        con.executemany("INSERT INTO gone (v) VALUES (?)", [(marker * 200,) for _ in range(40)])
        con.execute("DROP TABLE gone")                    # every page of it onto the freelist, bytes kept
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert con.execute("PRAGMA freelist_count").fetchone()[0] > 10
    finally:
        con.close()
    assert marker in src.read_bytes()                     # the premise: free pages hold the old rows
    dest = tmp_path / "copy.db"
    page_copy(str(src), dest)
    assert marker not in dest.read_bytes()
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    con = sqlite3.connect(dest)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM kept").fetchone()[0] == 50
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"     # one file, no WAL beside it
    finally:
        con.close()
    assert scrub_freelist(dest) > 10                      # idempotent: the same pages, zero again


def test_a_damaged_freelist_is_refused(tmp_path):
    db = tmp_path / "bad.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (v BLOB)")
    con.commit()
    con.close()
    data = bytearray(db.read_bytes())
    data[32:36] = (10 ** 6).to_bytes(4, "big")          # a freelist trunk page past the end of the file
    db.write_bytes(bytes(data))
    from server.backup.format import InvalidBackup
    with pytest.raises(InvalidBackup, match="freelist is damaged"):
        scrub_freelist(db)


async def test_the_copy_and_its_counts_are_one_moment_even_when_a_write_comes_between(tmp_path, monkeypatch):
    """The page copy and the manifest's counts are read from two read transactions, side by side. A
    writer that commits between their openings would make the manifest disagree with the image (and
    every restore refuse it): they are opened while this process holds the writer lock, so it waits."""
    import os

    from server.backup import image as image_mod
    from server.backup import snapshot as snapshot_mod
    from server.barrier.barrier import Barrier
    from server.storage.sqlite import SQLiteStorage
    storage = SQLiteStorage(str(tmp_path / "skm.db"))
    await storage.open()
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    opened: list[str] = []
    real = image_mod.read_snapshot

    def snapshot_with_a_write_before_the_second(path: str):
        if opened:                       # between the two: another process's write tries to land
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                other.execute("INSERT INTO projects (appkey, name, created_at) VALUES ('k', 'sneaked in', 'now')")
                opened.append("written")
            except sqlite3.OperationalError as e:
                opened.append(str(e))
            finally:
                other.close()
        opened.append("snapshot")
        return real(path)
    monkeypatch.setattr(snapshot_mod, "read_snapshot", snapshot_with_a_write_before_the_second)
    try:
        work = tmp_path / "work"
        work.mkdir()
        manifest = await snapshot_mod._sqlite_image(storage, storage.path, work / "image.db", barrier)
    finally:
        await storage.close()
    assert opened[0] == "snapshot" and opened[-1] == "snapshot" and "locked" in opened[1], opened
    con = sqlite3.connect(work / "image.db")
    try:
        for t in manifest.tables:
            assert con.execute(f"SELECT COUNT(*) FROM {t.name}").fetchone()[0] == t.count, t.name
    finally:
        con.close()
    assert manifest.payload_bytes == (work / "image.db").stat().st_size
