"""An audit log a database insider cannot rewrite undetected (issue 14), through the real `skm` CLI.

The four forgeries of the review, each done the way an insider with the database file would do
it (recomputing the chain with the project's own digest function), each reported by
`skm audit verify` live (keyed tags + checkpoints) and by `skm audit verify --offline` on an
export with only the checkpoint public key; a clean log verifies both ways.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from server.app import KeyServer
from server.audit import digest
from tests.support.cli import skm_cli
from tests.support.server import harness_backend

pytestmark = pytest.mark.skipif(harness_backend() != "sqlite", reason="edits the SQLite database file directly")


async def _traffic(h, n: int = 6) -> dict:
    import os
    store = await h.keystore("audited-" + os.urandom(3).hex())
    secret = await h.key(store, "SECRET", "db", secretValue="audit-integrity-value")
    for _ in range(n):
        st, _ = await h.client("GET", f"/secrets/{secret['keyId']}")
        assert st == 200
    return secret


async def _checkpoint(h) -> int:
    entry = await h.rt.audit.checkpointer.emit("periodic")
    return entry["checkpoint"]["seq"]


async def _recompute_from(db, seq: int) -> None:
    """What an insider does after an edit: recompute every digest from `seq` on and the head."""
    rows = await db.fetchall("SELECT * FROM audit_log WHERE seq >= ? ORDER BY seq", seq - 1)
    prev = None
    for r in map(dict, rows):
        if r["seq"] == seq - 1:
            prev = r["hash"]
            continue
        r["prev_hash"] = prev if prev is not None else r["prev_hash"]
        prev = digest(r)
        await db.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", r["prev_hash"], prev, r["seq"])
    await db.execute("UPDATE audit_head SET seq = (SELECT MAX(seq) FROM audit_log), hash = ? WHERE id = 1", prev)


async def _verify_live(h) -> tuple[int, str, dict]:
    code, out, err = await skm_cli(h, "audit", "verify")
    _, js, _ = await skm_cli(h, "audit", "verify", "--json")
    return code, out + err, json.loads(js)


async def _verify_offline(h, tmp: Path) -> tuple[int, str]:
    pem = tmp / "checkpoint.pub.pem"
    code, out, err = await skm_cli(h, "audit", "pubkey")
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----"), err
    pem.write_text(out)
    export = tmp / "export.jsonl"
    code, _, err = await skm_cli(h, "audit", "export", "-o", str(export))
    assert code == 0, err
    # Offline: no server, no database; the CLI reads only the two files.
    code, out, err = await skm_cli(h, "audit", "verify", "--offline", str(export), "--pubkey", str(pem),
                                   env={"SKM_ADDR": "https://127.0.0.1:9", "SKM_TOKEN": ""})
    return code, out + err


async def test_a_clean_log_verifies_live_and_offline(skm, tmp_path):
    await _traffic(skm)
    cp = await _checkpoint(skm)
    code, out, res = await _verify_live(skm)
    assert code == 0 and "intact" in out and "digests and keyed tags" in out, out
    assert res["keyed"] is True and res["checkpoints"]["latestSeq"] >= cp and res["checkpoints"]["sources"] == ["file"]
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 0 and "intact" in out, out


async def test_an_edited_record_recomputed_with_the_unkeyed_digest_is_reported(skm, tmp_path):
    await _traffic(skm)
    await _traffic(skm, 2)
    cp = await _checkpoint(skm)
    target = cp // 2
    db = skm.rt.storage
    await db.execute("UPDATE audit_log SET result = 'ok', actor = 'someone-else' WHERE seq = ?", target)
    await _recompute_from(db, target)
    code, out, res = await _verify_live(skm)
    assert code == 1 and res["brokenSeq"] == target and "tag does not match" in res["reason"], out
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 1 and f"BROKEN at record {cp}" in out and "checkpoint" in out, out


async def test_a_deleted_and_renumbered_record_is_reported(skm, tmp_path):
    await _traffic(skm)
    cp = await _checkpoint(skm)
    target = cp // 2
    db = skm.rt.storage
    await db.execute("DELETE FROM audit_log WHERE seq = ?", target)
    await db.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq > ?", target)
    await _recompute_from(db, target)
    code, out, res = await _verify_live(skm)
    assert code == 1 and res["brokenSeq"] == target, out
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 1 and "BROKEN" in out and "checkpoint" in out, out


async def test_a_truncated_tail_is_reported(skm, tmp_path):
    await _traffic(skm)
    cp = await _checkpoint(skm)
    db = skm.rt.storage
    keep = cp - 3
    await db.execute("DELETE FROM audit_log WHERE seq > ?", keep)
    last = await db.fetchone("SELECT hash FROM audit_log WHERE seq = ?", keep)
    await db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", keep, last["hash"])
    # Everything that remains is untouched: without checkpoints the chain alone looks intact.
    code, out, res = await _verify_live(skm)
    assert code == 1 and "records were removed from the end" in res["reason"] and f"covers record {cp}" in out, out
    # By now the verify requests themselves were recorded after the cut: the export's record at the
    # checkpoint's position is another record, or the export ends before it. Either way: refused.
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 1 and f"BROKEN at record" in out and "checkpoint" in out, out


async def test_replacing_the_database_with_an_older_copy_is_reported(skm, tmp_path):
    await _traffic(skm)
    await _checkpoint(skm)
    dbfile = Path(skm.server.config.storage_url()[len("sqlite:///"):])
    old = tmp_path / "old.db"
    src, dst = sqlite3.connect(dbfile), sqlite3.connect(old)
    src.backup(dst)                     # a consistent copy, as an insider's nightly copy would be
    src.close(), dst.close()
    await _traffic(skm, 10)
    cp = await _checkpoint(skm)
    cfg = skm.server.config
    await skm.server.stop()
    for p in dbfile.parent.glob(dbfile.name + "*"):
        p.unlink()
    old.rename(dbfile)
    skm.server = await KeyServer(cfg).start()
    code, out, res = await _verify_live(skm)
    assert code == 1 and ("older copy" in res["reason"] or "checkpoint" in res["reason"]), out
    assert f"{cp}" in out or res["brokenSeq"] <= cp
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 1 and "BROKEN" in out, out


async def test_checkpoints_are_signed_every_n_records(tmp_path):
    from tests.support.server import start_harness
    h = await start_harness(tmp_path, audit={"checkpoint_every": 5, "checkpoint_interval": 3600})
    try:
        await _traffic(h, 12)
        path = tmp_path / "data" / "audit-checkpoints.jsonl"

        def latest() -> int:
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            return max((e["checkpoint"]["seq"] for e in lines if e["checkpoint"]["kind"] == "periodic"), default=0)

        import asyncio
        head = await h.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        for _ in range(100):
            if latest() >= head - 5:
                break
            await asyncio.sleep(0.05)
        assert latest() >= head - 5, (latest(), head)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    finally:
        await h.close()


async def test_a_forged_epoch_is_reported(skm):
    await _traffic(skm)
    await _checkpoint(skm)
    await skm.rt.storage.execute("UPDATE audit_head SET epoch = 'feedfacefeedface' WHERE id = 1")
    code, out, res = await _verify_live(skm)
    assert code == 1 and "not sealed by this installation" in res["reason"], out


async def test_downgrading_to_unkeyed_links_is_reported(skm):
    await _traffic(skm)
    cp = await _checkpoint(skm)
    db = skm.rt.storage
    # Strip every tag and claim keyed links never began: a chain any insider can recompute.
    await db.execute("UPDATE audit_log SET tag = NULL")
    await db.execute("UPDATE audit_head SET keyed_from = 999999 WHERE id = 1")
    code, out, res = await _verify_live(skm)
    assert code == 1, out
    assert res["brokenSeq"] is not None and res["brokenSeq"] <= cp


async def test_untagged_records_are_reported(skm):
    # An insider rewrites the records after the latest checkpoint, recomputes their digests and nulls
    # their tags, hoping to pass them off as written while the barrier was sealed. The writer never
    # writes an untagged keyed record (those wait in memory for the key), so verify names the first.
    await _traffic(skm)
    await _checkpoint(skm)
    await _traffic(skm, 2)
    db = skm.rt.storage
    head = await db.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    await db.execute("UPDATE audit_log SET actor = 'someone-else', tag = NULL WHERE seq >= ?", head - 1)
    await _recompute_from(db, head - 1)
    code, out, res = await _verify_live(skm)
    assert code == 1 and res["brokenSeq"] == head - 1 and "has no tag" in res["reason"], out
