"""Files of the previous format versions (1, JSON lines; 2, the image under HMAC-SHA256) still verify and
restore, into either backend; a damaged one is still refused. New backups are format 3 (the image under
AES-256-GMAC)."""
from __future__ import annotations

import json
import os

import pytest

from server.backup.format import InvalidBackup
from server.backup.restore import restore, verify_file
from server.backup.schedule import backup_to_file
from server.barrier.barrier import Barrier, sealed_aad
from server.storage.factory import open_storage
from tests.support.backup_v1 import write_v1_backup


@pytest.fixture
async def source(tmp_path):
    """A SQLite store with a project, a key store, a secret's sealed version and audit records."""
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    src = open_storage(f"sqlite:///{tmp_path / 'src' / 'skm.db'}")
    await src.open()
    try:
        from server.audit.log import Audit
        audit = Audit(src, barrier)
        try:
            await audit.event("test.event", actor="tester", actor_kind="operator", detail={"n": 1})
        finally:
            await audit.close()
        await src.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?)",
                          "AppKeyV1", "v1", "2025-01-01T00:00:00.000000Z")
        yield src, barrier
    finally:
        await src.close()


async def test_a_format_1_file_restores_into_either_backend(source, storage_url, tmp_path):
    src, barrier = source
    old = tmp_path / "old.skmbak"
    manifest = await write_v1_backup(src, barrier, old)
    assert json.loads(old.read_bytes().split(b"\n", 1)[0])["formatVersion"] == 1
    report = await verify_file(old, barrier)
    assert report.manifest.format_version == 1 and report.records == manifest.total_records
    done = await restore(old, barrier, storage_url)
    assert done.audit["ok"] and done.records == manifest.total_records
    target = open_storage(storage_url)
    await target.open()
    try:
        assert await target.fetchval("SELECT name FROM projects WHERE appkey = ?", "AppKeyV1") == "v1"
        for t in manifest.tables:
            assert await target.fetchval(f"SELECT COUNT(*) AS n FROM {t.name}") == t.count, t.name
    finally:
        await target.close()


async def test_a_damaged_format_1_file_is_still_refused(source, tmp_path):
    src, barrier = source
    old = tmp_path / "old.skmbak"
    await write_v1_backup(src, barrier, old)
    lines = old.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"v1", b"v2") if b"v1" in lines[1] else lines[1][:-2] + b"0]"
    bad = tmp_path / "bad.skmbak"
    bad.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidBackup, match="integrity check failed"):
        await restore(bad, barrier, f"sqlite:///{tmp_path / 'target' / 'skm.db'}")
    assert not (tmp_path / "target" / "skm.db").exists()


async def test_new_backups_are_format_3_images_that_open_as_a_store(source, tmp_path):
    src, barrier = source
    path = tmp_path / "new.skmbak"
    await backup_to_file(src, barrier, path)
    data = path.read_bytes()
    first = data.index(b"\n") + 1
    m = json.loads(data[:first])
    assert m["formatVersion"] == 3 and m["payload"]["kind"] == "sqlite-image"
    assert m["mac"]["algorithm"] == "AES-256-GMAC" and len(m["mac"]["nonce"]) == 24
    image = data[first:first + m["payload"]["bytes"]]
    assert image.startswith(b"SQLite format 3\x00")
    assert json.loads(data[first + len(image):])["end"] == "skm-backup"
    report = await verify_file(path, barrier)
    assert report.unsealed.get("audit_head.hmac_key_sealed") == 1
    # What the sample opened is what the store holds, sealed under the record's identity.
    row = await src.fetchone("SELECT hmac_key_sealed FROM audit_head WHERE id = 1")
    assert barrier.open(row["hmac_key_sealed"], sealed_aad("audit_head", "hmac_key_sealed", 1))


async def test_a_format_2_file_verifies_and_restores_and_is_still_checked(source, storage_url, tmp_path, monkeypatch):
    """Backups already on disk from the release before (format 2: HMAC-SHA256) stay usable; a changed
    byte in one is refused as before; and a format 3 file relabelled as format 2 (its MAC named HMAC)
    is refused too."""
    from server.backup import snapshot
    src, barrier = source
    old = tmp_path / "v2.skmbak"
    monkeypatch.setattr(snapshot, "FORMAT_VERSION", 2)          # the format 2 writer: the same code, HMAC
    await backup_to_file(src, barrier, old)
    monkeypatch.undo()
    m = json.loads(old.read_bytes().split(b"\n", 1)[0])
    assert m["formatVersion"] == 2 and m["mac"]["algorithm"] == "HMAC-SHA256" and "nonce" not in m["mac"]
    report = await verify_file(old, barrier)
    assert report.manifest.format_version == 2 and report.to_api()["macAlgorithm"] == "HMAC-SHA256"
    done = await restore(old, barrier, storage_url)
    assert done.audit["ok"] and done.records == report.records
    data = bytearray(old.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.skmbak"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidBackup, match="integrity check failed"):
        await verify_file(bad, barrier)
    new = tmp_path / "v3.skmbak"
    await backup_to_file(src, barrier, new)
    first, rest = new.read_bytes().split(b"\n", 1)
    m = json.loads(first)
    m["formatVersion"], m["mac"]["algorithm"] = 2, "HMAC-SHA256"
    relabelled = tmp_path / "relabelled.skmbak"
    relabelled.write_bytes(json.dumps(m).encode() + b"\n" + rest)
    with pytest.raises(InvalidBackup):
        await verify_file(relabelled, barrier)
