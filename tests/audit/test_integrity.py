"""An audit log a database insider cannot rewrite undetected (issue 14), through the real `skm` CLI.

The four forgeries of the review, each done the way an insider with the database file would do
it (recomputing the chain with the project's own digest function), each reported by
`skm audit verify` live (keyed tags + checkpoints) and by `skm audit verify --offline` on an
export with only the checkpoint public key; a clean log verifies both ways.
"""
from __future__ import annotations

import contextlib
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


# --------------------------------------------------------------- `--data-dir`: the root key at hand or not
def _copy_database(data: Path, dest: Path) -> Path:
    """The database and the checkpoint file, without the root key or the keyring (another host's view)."""
    import shutil
    dest.mkdir()
    for p in data.iterdir():
        if p.name.startswith("skm.db") or p.name == "audit-checkpoints.jsonl":
            shutil.copy2(p, dest / p.name)
    return dest


async def _edited_and_stopped(h) -> tuple[Path, int]:
    """Issue 14's repro: an edited record, its digests recomputed with the unkeyed algorithm, the server
    stopped (a final checkpoint signed)."""
    await _traffic(h)
    await _checkpoint(h)
    db = h.rt.storage
    await db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3")
    await _recompute_from(db, 3)
    data = h.server.config.data_path
    await h.server.stop()
    return data, 3


async def test_data_dir_verify_checks_tags_and_checkpoints_with_the_root_key(skm, tmp_path):
    data, seq = await _edited_and_stopped(skm)
    code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(data))
    assert code == 1 and f"BROKEN at record {seq}" in out and "tag does not match" in out, out + err
    code, js, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(data), "--json")
    res = json.loads(js)
    assert code == 1 and res["status"] == "broken" and res["keyed"] and res["brokenSeq"] == seq, js + err
    assert res["checkpoints"]["sources"] == ["file"] and res["checkpoints"]["checked"] >= 2


async def test_data_dir_verify_of_a_clean_log_reads_the_checkpoints(skm, tmp_path):
    await _traffic(skm)
    data = skm.server.config.data_path
    await skm.server.stop()                      # a final checkpoint at the head
    code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(data))
    assert code == 0 and "audit chain intact" in out and "digests and keyed tags" in out, out + err
    assert "0 record(s) after it; read from file" in out, out


async def test_data_dir_verify_without_the_root_key_never_says_intact(skm, tmp_path):
    data, _ = await _edited_and_stopped(skm)
    elsewhere = _copy_database(data, tmp_path / "copy")
    code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(elsewhere))
    assert code == 8, (code, out, err)
    assert "intact" not in out.lower() and "NOT VERIFIED" in out and "tags and checkpoints were NOT checked" in out
    assert "skm audit verify` against the running server" in out and "root key" in out, out
    code, js, _ = await skm_cli(skm, "audit", "verify", "--data-dir", str(elsewhere), "--json")
    res = json.loads(js)
    assert code == 8 and res["ok"] is False and res["status"] == "unverified" and res["keyed"] is False, res
    # The database copy was only read: no key or epoch was made in it.
    assert not (elsewhere / "root.key").exists()
    con = sqlite3.connect(elsewhere / "skm.db")
    try:
        assert con.execute("SELECT COUNT(*) FROM audit_log WHERE actor = 'someone-else'").fetchone()[0] == 1
    finally:
        con.close()


# ------------------------------------------------------------------ no checkpoint found is not intact
async def _truncate_tail(db, n: int = 4) -> int:
    head = await db.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    keep = head - n
    await db.execute("DELETE FROM audit_log WHERE seq > ?", keep)
    last = await db.fetchone("SELECT hash FROM audit_log WHERE seq = ?", keep)
    await db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", keep, last["hash"])
    return keep


@pytest.mark.parametrize("how", ["deleted", "emptied"])
async def test_a_truncated_tail_with_the_checkpoint_log_removed_is_reported(skm, tmp_path, how):
    """Issue 14's repro: the default set-up (checkpoints in `<data_dir>/audit-checkpoints.jsonl`), the
    last 4 records cut and the checkpoint file deleted or emptied."""
    await _traffic(skm)
    await _checkpoint(skm)
    await _truncate_tail(skm.rt.storage)
    cpf = skm.server.config.data_path / "audit-checkpoints.jsonl"
    cpf.unlink() if how == "deleted" else cpf.write_text("")
    code, out, res = await _verify_live(skm)
    assert code == 1 and res["ok"] is False and res["status"] == "broken", out
    assert "the checkpoint log is missing or was emptied" in res["reason"] and "NOT INTACT" in out, out
    # The server goes on signing (by time or count): a refilled log still lacks the chain's start checkpoint.
    await _checkpoint(skm)
    code, out, res = await _verify_live(skm)
    assert code == 1 and "holds no start checkpoint" in res["reason"], out


async def test_an_export_without_its_checkpoints_does_not_verify_offline(skm, tmp_path):
    await _traffic(skm)
    await _checkpoint(skm)
    code, out = await _verify_offline(skm, tmp_path)
    assert code == 0 and "intact" in out, out
    export = tmp_path / "export.jsonl"
    lines = export.read_text().splitlines()
    export.write_text("\n".join(x for x in lines if '"checkpoint"' not in x) + "\n")
    code, out, err = await skm_cli(skm, "audit", "verify", "--offline", str(export), "--pubkey",
                                   str(tmp_path / "checkpoint.pub.pem"), env={"SKM_ADDR": "https://127.0.0.1:9"})
    assert code == 1 and "nothing pins its records" in out and "intact" not in out.replace("NOT INTACT", ""), out + err


async def test_a_blanked_epoch_is_reported_and_not_restarted(skm):
    """Blanking audit_head's epoch would make the next checkpoint start a new history (the old epoch's
    checkpoints, past a truncation, no longer counted). Refused once a checkpoint key exists."""
    await _traffic(skm)
    await _checkpoint(skm)
    await _truncate_tail(skm.rt.storage)
    await skm.rt.storage.execute("UPDATE audit_head SET epoch = NULL, epoch_sealed = NULL WHERE id = 1")
    code, out, res = await _verify_live(skm)
    assert code == 1 and "the audit epoch was removed" in res["reason"], out
    from server.audit.checkpoints import EpochForged
    with pytest.raises(EpochForged):
        await skm.rt.audit.checkpointer.emit("periodic")
    assert await skm.rt.storage.fetchval("SELECT epoch FROM audit_head WHERE id = 1") is None


async def test_a_restored_chain_is_unverified_until_its_restore_checkpoint(skm):
    """A restore starts a new epoch; until the next start signs its `restore` checkpoint the chain is not
    pinned: `unverified` (exit 8), then intact once the server has started."""
    from server.audit.checkpoints import start_restored_epoch
    from server.backup.keys import unsealed_barrier
    from server.storage.factory import open_storage
    await _traffic(skm)
    await _checkpoint(skm)
    cfg = skm.server.config
    await skm.server.stop()
    # What `skm backup restore` does to the store it wrote, with the server down.
    db = open_storage(cfg.storage_url())
    await db.open()
    try:
        async with unsealed_barrier(cfg) as barrier:
            await start_restored_epoch(db, barrier, restored_from={"backupId": "b1"})
    finally:
        await db.close()
    code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(cfg.data_path))
    assert code == 8 and "restored from a backup" in out and "start the server" in out, out + err
    assert f"checkpoints were looked for in the file {cfg.data_path / 'audit-checkpoints.jsonl'}" in out, out
    skm.server = await KeyServer(cfg).start()
    code, out, res = await _verify_live(skm)
    assert code == 0 and res["ok"], out
    kinds = [json.loads(x)["checkpoint"]["kind"] for x in
             (cfg.data_path / "audit-checkpoints.jsonl").read_text().splitlines()]
    assert kinds.count("restore") == 1 and kinds.index("restore") < len(kinds) - 1, kinds


@contextlib.asynccontextmanager
async def _bare_audit(tmp_path: Path, records: int):
    """An unsealed Audit on its own SQLite file with `records` records, no server around it."""
    import os
    from server.audit import Audit
    from server.barrier.barrier import Barrier
    from server.storage.sqlite import SQLiteStorage
    storage = SQLiteStorage(str(tmp_path / "skm.db"))
    await storage.open()
    try:
        barrier = Barrier()
        barrier.unseal({1: os.urandom(32)}, 1)
        audit = Audit(storage, barrier, config=None)
        for i in range(records):
            await audit.append({"plane": "system", "actor": "t", "actor_kind": "system", "action": "test.bare",
                                "result": "ok", "detail": {"i": i}})
        yield audit
    finally:
        await storage.close()


async def test_records_before_any_checkpoint_are_unverified(tmp_path):
    """A chain nobody has signed a checkpoint of yet (a server that never started since it was made):
    `unverified`, not intact; a broken record still says broken."""
    async with _bare_audit(tmp_path, 3) as audit:
        res = await audit.verify()
        assert not res.ok and res.status == "unverified" and "no checkpoint has been signed" in res.reason, res
        await audit.db.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 2")
        res = await audit.verify()
        assert res.status == "broken" and res.broken_seq == 2, res


async def test_a_run_stopped_before_its_start_checkpoint_still_pins_what_it_wrote(tmp_path):
    """A server stopped within a second or two of opening (its start checkpoint not yet stored) still
    leaves a start and a final checkpoint at its last record, so a truncation of what it wrote is
    caught, not left to whenever the next run starts."""
    from server.audit.checkpoints import Checkpointer, FileSink
    async with _bare_audit(tmp_path, 4) as audit:
        log = tmp_path / "checkpoints.jsonl"
        cp = Checkpointer(audit, [FileSink(log)], interval=3600)
        cp.start()
        await cp.stop()                       # before its task ever ran: nothing announced yet
        entries = [json.loads(line)["checkpoint"] for line in log.read_text().splitlines()]
        assert [(e["kind"], e["seq"]) for e in entries] == [("start", 4), ("final", 4)], entries


async def test_a_replaced_checkpoint_key_is_reported(skm, tmp_path):
    """The insider's way round the checkpoints: cut the tail, blank the checkpoint key and the epoch, and
    let the next start sign a fresh history under a new key. The checkpoint log still holds what the old
    key signed, and nothing else signs there: reported, live and from the data dir."""
    await _traffic(skm)
    cut_at = await _checkpoint(skm)
    await _truncate_tail(skm.rt.storage)
    await skm.rt.storage.execute("UPDATE audit_head SET checkpoint_key_sealed = NULL, epoch = NULL, "
                                 "epoch_sealed = NULL WHERE id = 1")
    cfg = skm.server.config
    await skm.server.stop()
    skm.server = await KeyServer(cfg).start()           # a new key, a new epoch, a start checkpoint under it
    code, out, res = await _verify_live(skm)
    assert code == 1 and res["status"] == "broken", out
    assert "signed by another checkpoint key" in res["reason"] and f"up to seq {cut_at}" in res["reason"], out
    assert res["checkpoints"]["otherKeys"], res
    await skm.server.stop()
    code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(cfg.data_path))
    assert code == 1 and "signed by another checkpoint key" in out, out + err
