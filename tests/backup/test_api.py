"""POST /api/v1/backup: admin only, audited, one at a time, a stream a reader accepts."""
from __future__ import annotations

import asyncio
import json
import time

from server.api.mgmt.backup_routes import backup_lock
from server.backup.restore import verify_file


async def until(fetch, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (got := await fetch()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return got


async def _post(skm, token: str | None = None) -> tuple[int, bytes, dict]:
    s = skm._default()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.post(f"{skm.mgmt_url}/api/v1/backup", headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_an_admin_gets_a_complete_verifiable_stream_and_it_is_audited(skm):
    store = await skm.keystore("api")
    await skm.key(store, "SECRET", "s", secretValue="streamed-but-sealed")
    status, body, headers = await _post(skm, skm.init.token)
    assert status == 200
    assert headers["Content-Type"] == "application/octet-stream"
    assert "attachment" in headers["Content-Disposition"] and ".skmbak" in headers["Content-Disposition"]
    assert b"streamed-but-sealed" not in body
    (skm.tmp / "api.skmbak").write_bytes(body)
    report = await verify_file(skm.tmp / "api.skmbak", skm.rt.barrier)
    assert report.records == report.manifest.total_records and report.bytes == len(body)
    assert report.manifest.backend == skm.rt.storage.dialect and report.manifest.format_version == 3
    assert report.unsealed.get("key_versions.material_sealed", 0) >= 1
    reader = report
    # Who took it is durable before the first byte left...
    start = await skm.rt.storage.fetchall("SELECT actor, action, detail FROM audit_log WHERE action = ?",
                                          "backup.start")
    assert [(r["actor"], json.loads(r["detail"])["backupId"]) for r in start] == \
        [(skm.init.operator, reader.manifest.backup_id)]
    # ...and the request's own record follows once the stream has ended.
    async def request_record():
        return await skm.rt.storage.fetchall("SELECT actor, action, result, status, detail FROM audit_log "
                                             "WHERE route = ? ORDER BY seq", "/api/v1/backup")
    rows = await until(request_record)
    assert rows[-1]["actor"] == skm.init.operator and rows[-1]["result"] == "ok"
    assert rows[-1]["action"] == "backup.create" and rows[-1]["status"] == 200
    assert json.loads(rows[-1]["detail"])["backupId"] == reader.manifest.backup_id


async def test_only_an_admin_may_take_a_backup(skm):
    ops = skm.rt.operators
    viewer = await ops.create("watcher", "viewer")
    token = await ops.issue_token(viewer, "test")
    status, body, _ = await _post(skm, token)
    assert status == 403 and b"skm-backup" not in body
    status, body, _ = await _post(skm, None)
    assert status == 401 and b"skm-backup" not in body
    rows = await skm.rt.storage.fetchall("SELECT actor, result FROM audit_log WHERE route = ? ORDER BY seq",
                                         "/api/v1/backup")
    assert [(r["actor"], r["result"]) for r in rows] == [("watcher", "denied"), ("anonymous", "denied")]


async def test_one_backup_at_a_time(skm):
    async with backup_lock(skm.rt):
        status, body, _ = await _post(skm, skm.init.token)
    assert status == 409 and b"already running" in body
    status, _body, _ = await _post(skm, skm.init.token)
    assert status == 200
