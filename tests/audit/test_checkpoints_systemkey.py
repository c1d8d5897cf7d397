"""Checkpoints kept by the system-key server survive a key-server restart and a system-key rotation.

A real system-key server (mTLS, allow-list) keeps the append-only checkpoint log; the key server
has no checkpoint file, so the only place the checkpoints live is that other host. After a restart
and a full system-key rotation (rotate, refresh, rewrap, retire the old version) the checkpoint key
is the same, the chain verifies, and truncating the database's tail is still caught."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from server.systemkey.checkpoints import CheckpointLog
from tests.barrier.test_rotation_cli import mgmt_env, server_toml
from tests.support.cli import skm_cli
from tests.systemkey.test_sealed_start import run_cli, stack_of, wait_unsealed


async def _verify(h) -> dict:
    code, out, err = await skm_cli(h, "audit", "verify", "--json")
    res = json.loads(out)
    assert (code == 0) == res["ok"], err
    return res


async def _started(h) -> None:
    """The start checkpoint is signed by the checkpointer's first round after unsealing."""
    for _ in range(600):
        if h.rt.audit.checkpointer is not None and h.rt.audit.checkpointer._started:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the checkpointer did not start")


async def _pubkey(h) -> str:
    code, out, err = await skm_cli(h, "audit", "pubkey")
    assert code == 0, err
    return out


async def test_checkpoints_survive_restart_and_system_key_rotation(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        assert not (st.ks_cfg.data_path / "audit-checkpoints.jsonl").exists()
        store = await h.keystore("cp")
        key = await h.key(store, "SECRET", "pw", secretValue="checkpointed-value")
        for _ in range(5):
            assert (await h.client("GET", f"/secrets/{key['keyId']}"))[0] == 200
        await _started(h)
        await h.rt.audit.checkpointer.emit("periodic")
        res = await _verify(h)
        assert res["ok"] and res["checkpoints"]["sources"] == ["systemkey"] and res["checkpoints"]["checked"] >= 2
        pub = await _pubkey(h)
        log = CheckpointLog(st.sk_cfg.data_path)
        assert oct(log.path.stat().st_mode & 0o777) == "0o600"
        before = len(log.read(None))

        # restart: a final checkpoint at stop, a start checkpoint after unsealing
        await st.stop_keyserver()
        assert len(log.read(None)) == before + 1 and log.read(None)[-1]["checkpoint"]["kind"] == "final"
        h = await st.start_keyserver()
        await wait_unsealed(h)
        await _started(h)
        res = await _verify(h)
        assert res["ok"], res
        assert await _pubkey(h) == pub

        # a full system-key rotation: rotate, refresh, rewrap, retire the old version
        env = mgmt_env(h)
        ks_toml = server_toml(tmp_path / "keyserver.toml", st.ks_cfg.data_path)
        code, _, err = await run_cli("systemkey", "rotate", "--data-dir", str(st.sk_cfg.data_path),
                                     "--rootkey-config", str(ks_toml), "--json")
        assert code == 0, err
        code, _, err = await run_cli("barrier", "refresh", "--json", env=env)
        assert code == 0, err
        code, out, err = await run_cli("barrier", "rewrap", env=env, timeout=120)
        assert code == 0, (out, err)
        code, out, err = await run_cli("barrier", "retire", "1", env=env)
        assert code == 0, (out, err)
        assert h.rt.barrier.versions() == [2]
        h.rt.audit._key = h.rt.audit._link = None      # nothing cached: the keys come from the re-sealed rows
        await h.rt.audit.checkpointer.emit("periodic")
        res = await _verify(h)
        assert res["ok"] and res["keyed"], res
        assert await _pubkey(h) == pub

        # the system-key server's copy still catches a truncated tail
        db = h.rt.storage
        head = await db.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        keep = head - 4
        await db.execute("DELETE FROM audit_log WHERE seq > ?", keep)
        last = await db.fetchone("SELECT hash FROM audit_log WHERE seq = ?", keep)
        await db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", keep, last["hash"])
        res = await _verify(h)
        assert not res["ok"] and "removed from the end" in res["reason"], res


async def test_the_system_key_server_refuses_unsigned_or_unknown_callers(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        sink = [s for s in h.rt.audit.sinks() if s.name == "systemkey"][0]
        entry = await h.rt.audit.checkpointer.emit("periodic")
        forged = json.loads(json.dumps(entry))
        forged["checkpoint"]["seq"] += 1000
        import aiohttp
        async with await sink._session() as s:
            async with s.post(st.sk_url + "/v1/audit/checkpoints", json=forged) as r:
                assert r.status == 400 and "signature" in (await r.json())["header"]["resultDetail"]
            async with s.post(st.sk_url + "/v1/audit/checkpoints", data=b"[" * 100000,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status in (400, 413)
        # a certificate of the same CA that is not on the allow-list cannot read or write
        cert, key = h.client_cert("stranger")
        import ssl
        ctx = ssl.create_default_context(cafile=str(h.pki.ca_cert))
        ctx.load_cert_chain(cert, key)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(st.sk_url + "/v1/audit/checkpoints") as r:
                assert r.status == 403
            async with s.post(st.sk_url + "/v1/audit/checkpoints", json=entry) as r:
                assert r.status == 403
        stored = CheckpointLog(st.sk_cfg.data_path).read(None)
        assert all(e["checkpoint"]["seq"] < 1000 for e in stored)


async def test_records_made_while_sealed_are_written_tagged_once_it_opens(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        h = await st.start_keyserver()                       # no system-key server yet: sealed
        assert h.rt.barrier.sealed
        st_, _ = await h.client("GET", f"/secrets/{'0' * 32}")
        assert st_ == 503
        assert await h.rt.storage.fetchval("SELECT COUNT(*) FROM audit_log WHERE tag IS NULL") == 0
        assert h.rt.audit.held                               # held, in order, until the key is there
        assert await h.metric("skm_audit_held_records") >= 1
        await st.start_systemkey()
        await wait_unsealed(h, timeout=30)
        await _started(h)
        rows = await h.rt.storage.fetchall("SELECT * FROM audit_log WHERE action = 'secret.read'")
        assert rows and rows[0]["status"] == 503 and rows[0]["tag"] is not None
        assert not h.rt.audit.held and await h.metric("skm_audit_held_records") == 0
        res = await _verify(h)
        assert res["ok"] and res["keyed"], res


async def test_an_unreachable_checkpoint_log_is_not_intact(tmp_path: Path):
    """The system-key server keeps the only checkpoint log. While it is down, verify cannot rule out a
    truncation: `unverified` (exit 8) naming the unreachable store, never intact; back up, intact again.
    Its log emptied (it answers, holding nothing of this chain): broken."""
    async with stack_of(tmp_path) as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        await _started(h)
        store = await h.keystore("cp")
        key = await h.key(store, "SECRET", "pw", secretValue="checkpointed-value")
        assert (await h.client("GET", f"/secrets/{key['keyId']}"))[0] == 200
        await h.rt.audit.checkpointer.emit("periodic")
        assert (await _verify(h))["ok"]

        await st.stop_systemkey()
        code, out, err = await skm_cli(h, "audit", "verify")
        assert code == 8 and "NOT VERIFIED" in out and "no checkpoint could be read: systemkey" in out, out + err
        assert "intact" not in out.lower(), out
        res = await _verify(h)
        assert res["status"] == "unverified" and res["checkpoints"]["unreadable"][0].startswith("systemkey:"), res

        await st.start_systemkey()
        res = await _verify(h)
        assert res["ok"] and res["status"] == "intact", res

        # The log emptied on the system-key server: it answers and holds nothing of this chain.
        log = CheckpointLog(st.sk_cfg.data_path)
        log.path.write_text("")
        res = await _verify(h)
        assert res["status"] == "broken" and "missing or was emptied" in res["reason"], res
