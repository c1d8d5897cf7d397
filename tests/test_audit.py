"""The audit log on a real server: who/what/result of every request, the hash chain, tamper detection
with the real `skm audit verify` (online and offline), no values recorded, fail-closed writes."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

from server.audit import digest, verify_chain
from server.storage.factory import open_storage

SKM = [sys.executable, "-m", "server.cli.main"]
SECRET = "s3cr3t-audit-value-7f1c"
PLAINTEXT = "plaintext-audit-value-9e2d"


async def skm_cli(h, *args: str, env: dict | None = None) -> tuple[int, str, str]:
    e = {**os.environ, "SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert),
         "SKM_CONFIG": "/nonexistent", "COLUMNS": "200", **(env or {})}
    p = await asyncio.create_subprocess_exec(*SKM, *args, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE, env=e)
    out, err = await p.communicate()
    return p.returncode, out.decode(), err.decode()


def _offline(skm) -> list[str]:
    """Arguments that make the CLI read this harness's database directly (SQLite or PostgreSQL)."""
    cfg = skm.tmp / "offline.toml"
    lines = [f'data_dir = "{skm.tmp / "data"}"']
    if skm.rt.config.storage:
        lines.append(f'storage = "{skm.rt.config.storage}"')
    cfg.write_text("\n".join(lines) + "\n")
    return ["--config", str(cfg)]


async def _workload(skm) -> dict:
    store = await skm.keystore("audited", certificateAuthUse="N")
    secret = await skm.key(store, "SECRET", "db", secretValue=SECRET)
    aes = await skm.key(store, "SYMMETRIC_KEY", "aes")
    cert, key = skm.client_cert("app1")
    s = skm.session(cert, key)
    st, out = await skm.client("GET", f"/secrets/{secret['keyId']}", session=s,
                               headers={"X-TOAST-CLIENT-MAC-ADDR": "02:00:00:00:00:aa"})
    assert st == 200 and out["body"]["secret"] == SECRET
    st, out = await skm.client("POST", f"/symmetric-keys/{aes['keyId']}/encrypt", json={"plaintext": PLAINTEXT})
    assert st == 200
    ciphertext = out["body"]["ciphertext"]
    st, out = await skm.client("POST", f"/symmetric-keys/{aes['keyId']}/decrypt", json={"ciphertext": ciphertext})
    assert st == 200 and out["body"]["plaintext"] == PLAINTEXT
    st, _ = await skm.mgmt("POST", f"/keys/{secret['keyId']}/rotate", json={"secretValue": SECRET + "-v2"})
    assert st == 200
    # A denial: an address the store does not allow (remove loopback, then read).
    await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/auths/ipv4s/schedule-deletion",
                   json={"value": "127.0.0.1"})
    st, out = await skm.client("GET", f"/secrets/{secret['keyId']}")
    assert st == 403
    await skm.mgmt("GET", "/keystores", token="skm_0000000000000000_bogus")
    return {"store": store, "secret": secret, "aes": aes, "cert": cert, "ciphertext": ciphertext}


async def test_records_who_what_result_and_the_chain_verifies(skm):
    w = await _workload(skm)
    st, out = await skm.mgmt("GET", f"/audit?keyId={w['secret']['keyId']}&plane=data")
    recs = out["body"]["records"]
    read_ok, denied = recs[0], recs[-1]
    der = __import__("ssl").PEM_cert_to_DER_cert(w["cert"].read_text())
    assert read_ok["result"] == "ok" and read_ok["method"] == "GET" and read_ok["status"] == 200
    assert read_ok["route"].endswith("/secrets/{keyid}") and read_ok["ip"] == "127.0.0.1"
    assert read_ok["fingerprint"] == hashlib.sha256(der).hexdigest()
    assert read_ok["mac"] == "02:00:00:00:00:aa" and read_ok["actor"] == "appkey"
    assert read_ok["keyStoreId"] == w["store"]["keyStoreId"]
    assert denied["result"] == "denied" and denied["status"] == 403 and "IPv4" in denied["reason"]
    # Management plane: the operator, and a refused token as anonymous with its reason.
    st, out = await skm.mgmt("GET", "/audit?plane=mgmt&result=denied")
    assert any(r["actor"] == "anonymous" and "not valid" in r["reason"] for r in out["body"]["records"])
    st, out = await skm.mgmt("GET", f"/audit?plane=mgmt&keyId={w['secret']['keyId']}")
    recs = out["body"]["records"]
    assert [(r["actor"], r["action"]) for r in recs] == [("admin", "key.create"), ("admin", "key.rotate")]
    assert recs[1]["detail"]["bodyHmac"].startswith("hmac-sha256:")
    # Each record carries the hash of the one before.
    st, out = await skm.mgmt("GET", "/audit?limit=1000")
    allrecs = out["body"]["records"]
    assert [r["seq"] for r in allrecs] == list(range(1, len(allrecs) + 1))
    assert all(b["prevHash"] == a["hash"] for a, b in zip(allrecs, allrecs[1:]))
    code, stdout, err = await skm_cli(skm, "audit", "verify")
    assert code == 0 and "intact" in stdout, (stdout, err)
    code, stdout, err = await skm_cli(skm, "audit", "verify", "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True


async def test_no_audit_record_holds_a_value(skm):
    w = await _workload(skm)
    st, out = await skm.mgmt("GET", "/audit?limit=1000")
    dump = json.dumps(out)
    material = await skm.rt.keys.crypto.version_raw(await skm.rt.keys.key(w["aes"]["keyId"]), 0)
    forbidden = [SECRET, SECRET + "-v2", PLAINTEXT, w["ciphertext"], base64.b64encode(material).decode(),
                 material.hex(), skm.init.token]
    for value in forbidden:
        assert value not in dump
    rows = await skm.rt.storage.fetchall("SELECT * FROM audit_log")
    assert len(rows) > 10
    text = json.dumps(rows, default=str)
    for value in forbidden:
        assert value not in text
    # Nor anywhere in the database files (values are sealed; audit keeps HMACs).
    if skm.rt.storage.dialect != "sqlite":
        return
    blob = b"".join(p.read_bytes() for p in (skm.tmp / "data").glob("skm.db*"))
    for value in (SECRET, PLAINTEXT, w["ciphertext"]):
        assert value.encode() not in blob


async def test_editing_or_deleting_a_row_is_reported_by_the_cli(skm):
    await _workload(skm)
    db = skm.rt.storage
    n = await db.fetchval("SELECT MAX(seq) AS n FROM audit_log")
    target = n // 2
    # Edit: make a denial look like a success.
    await db.execute("UPDATE audit_log SET result = 'ok', actor = 'someone-else' WHERE seq = ?", target)
    code, out, err = await skm_cli(skm, "audit", "verify")
    assert code == 1 and f"BROKEN at record {target}:" in out and "changed" in out, (out, err)
    code, out, _ = await skm_cli(skm, "audit", "verify", "--json")
    assert json.loads(out)["brokenSeq"] == target
    # Offline, reading the database directly, the same answer.
    code, out, err = await skm_cli(skm, "audit", "verify", *_offline(skm), env={"SKM_ADDR": "https://127.0.0.1:9"})
    assert code == 1 and f"BROKEN at record {target}:" in out, (out, err)
    if db.dialect == "sqlite":
        code, out, err = await skm_cli(skm, "audit", "verify", "--data-dir", str(skm.tmp / "data"))
        assert code == 1 and f"BROKEN at record {target}:" in out, (out, err)
    # Restore by recomputing that row's hash: the next record no longer chains to it.
    row = await db.fetchone("SELECT * FROM audit_log WHERE seq = ?", target)
    await db.execute("UPDATE audit_log SET hash = ? WHERE seq = ?", digest(dict(row)), target)
    res = await verify_chain(skm.rt.storage)
    assert res.broken_seq == target + 1 and "does not chain" in res.reason
    # Delete a row in the middle.
    await db.execute("DELETE FROM audit_log WHERE seq = ?", target)
    code, out, _ = await skm_cli(skm, "audit", "verify")
    assert code == 1 and f"BROKEN at record {target}:" in out and "missing" in out


async def test_deleting_the_last_rows_is_reported(skm):
    await _workload(skm)
    res = await verify_chain(skm.rt.storage)
    assert res.ok
    head = res.head_seq
    # Stop the server so no new record lands, then truncate the tail offline.
    args = _offline(skm)
    await skm.server.stop()
    db = open_storage(skm.server.config.storage_url())
    await db.open()
    try:
        await db.execute("DELETE FROM audit_log WHERE seq >= ?", head - 1)
    finally:
        await db.close()
    p = await asyncio.create_subprocess_exec(*SKM, "audit", "verify", *args,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                             env={**os.environ, "SKM_CONFIG": "/nonexistent"})
    out, err = await p.communicate()
    assert p.returncode == 1 and f"BROKEN at record {head - 1}:" in out.decode(), (out, err)


async def test_chain_stays_linear_under_concurrent_requests(skm):
    store = await skm.keystore("busy")
    aes = await skm.key(store, "SYMMETRIC_KEY", "aes")
    before = await skm.rt.storage.fetchval("SELECT MAX(seq) AS n FROM audit_log")

    async def one(i: int):
        if i % 3 == 0:
            return await skm.mgmt("GET", "/keystores")
        return await skm.client("POST", f"/symmetric-keys/{aes['keyId']}/encrypt", json={"plaintext": f"p{i}"})

    results = await asyncio.gather(*[one(i) for i in range(120)])
    assert all(st == 200 for st, _ in results)
    await asyncio.sleep(0.1)
    after = await skm.rt.storage.fetchval("SELECT MAX(seq) AS n FROM audit_log")
    assert after - before >= 120
    res = await verify_chain(skm.rt.storage)
    assert res.ok and res.checked == res.head_seq, res


async def test_audit_write_failure_fails_the_request_unless_configured(skm):
    store = await skm.keystore("fc")
    failures = await skm.metric("skm_audit_write_failures_total")
    await skm.rt.storage.execute("ALTER TABLE audit_log RENAME TO audit_log_away")
    try:
        st, out = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}")
        assert st == 503 and "audit" in out["header"]["resultDetail"]
        # Operators see it in /metrics (its own record cannot be written either).
        assert await skm.metric("skm_audit_write_failures_total") > failures
        st, out = await skm.client("GET", "/confirm")
        assert st == 503
        audit = skm.rt.audit
        audit.settings = dataclasses.replace(audit.settings, fail_closed=False)
        st, out = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}")
        assert st == 200
        audit.settings = dataclasses.replace(audit.settings, fail_closed=True)
    finally:
        await skm.rt.storage.execute("ALTER TABLE audit_log_away RENAME TO audit_log")
    st, _ = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}")
    assert st == 200
    # The failed appends rolled back whole: the chain is intact.
    assert (await verify_chain(skm.rt.storage)).ok


async def test_export_json_lines_since(skm, tmp_path):
    await _workload(skm)
    st, out = await skm.mgmt("GET", "/audit?limit=1000")
    recs = out["body"]["records"]
    middle = recs[len(recs) // 2]["time"]
    code, stdout, err = await skm_cli(skm, "audit", "export", "--since", middle)
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    records = [r for r in lines if "seq" in r]
    assert records and all(r["time"] >= middle for r in records)
    # The signed checkpoints follow the records, for offline verification.
    assert all("checkpoint" in r for r in lines[len(records):]) and len(lines) > len(records)
    assert {r["seq"] for r in records} >= {r["seq"] for r in recs if r["time"] >= middle}
    out_file = tmp_path / "audit.jsonl"
    code, _, err = await skm_cli(skm, "audit", "export", *_offline(skm), "-o", str(out_file))
    assert code == 0, err
    offline = [json.loads(line) for line in Path(out_file).read_text().splitlines()]
    assert [r["seq"] for r in offline][:len(recs)] == [r["seq"] for r in recs]


async def test_metrics_count_the_audit_writers_commits(skm):
    store = await skm.keystore("metered")
    key = await skm.key(store, "SECRET", "pw", secretValue=SECRET)
    records, batches = (await skm.metric("skm_audit_records_total"), await skm.metric("skm_audit_batch_seconds_count"))
    head = int(await skm.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1"))
    results = await asyncio.gather(*[skm.client("GET", f"/secrets/{key['keyId']}") for _ in range(40)])
    assert all(st == 200 for st, _ in results)
    written = int(await skm.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")) - head
    # Every record this process committed is counted (the scrape's own record is committed after it answers).
    assert written >= 40
    assert await skm.metric("skm_audit_records_total") - records >= written
    committed = await skm.metric("skm_audit_batch_seconds_count") - batches
    assert 1 <= committed <= written         # a batch per commit (group commit itself: the test below)
    assert await skm.metric("skm_audit_write_failures_total") == 0
    assert await skm.metric("skm_audit_held_records") == 0


async def test_concurrent_records_are_group_committed_in_order(skm):
    """Records queued together commit in one transaction each batch; the chain stays linear."""
    db, audit = skm.rt.storage, skm.rt.audit
    opened = 0
    real = db.transaction

    def counting():
        nonlocal opened
        opened += 1
        return real()

    before = int(await db.fetchval("SELECT seq FROM audit_head WHERE id = 1"))
    db.transaction = counting
    try:
        seqs = await asyncio.gather(*[audit.event("test.batch", actor=f"t{i}", detail={"i": i}) for i in range(300)])
    finally:
        del db.transaction
    assert sorted(seqs) == list(range(before + 1, before + 301))
    assert seqs == sorted(seqs)                         # queue order is chain order
    assert opened <= 10, f"{opened} transactions for 300 records: not batched"
    rows = await db.fetchall("SELECT seq, actor FROM audit_log WHERE seq > ? ORDER BY seq", before)
    assert [r["actor"] for r in rows] == [f"t{i}" for i in range(300)]
    head = await db.fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
    assert int(head["seq"]) == before + 300
    res = await verify_chain(db)
    assert res.ok and res.checked == res.head_seq, res


async def test_a_failed_batch_fails_every_record_in_it(skm):
    db, audit = skm.rt.storage, skm.rt.audit
    before = await verify_chain(db)
    await db.execute("ALTER TABLE audit_log RENAME TO audit_log_away")
    try:
        out = await asyncio.gather(*[audit.event("test.fail", actor=f"f{i}") for i in range(50)],
                                   return_exceptions=True)
    finally:
        await db.execute("ALTER TABLE audit_log_away RENAME TO audit_log")
    assert all(isinstance(r, Exception) for r in out), out
    after = await verify_chain(db)
    assert after.ok and after.head_seq == before.head_seq        # nothing half-written
    assert isinstance(await audit.event("test.after", actor="ok"), int)     # the writer recovers


async def test_static_files_and_login_passwords_stay_out_of_the_log(skm):
    db = skm.rt.storage
    s = skm._default()
    async with s.get(f"{skm.mgmt_url}/console/static/console.css") as r:
        assert r.status == 200
    before = int(await db.fetchval("SELECT seq FROM audit_head WHERE id = 1"))
    async with s.get(f"{skm.mgmt_url}/console/static/console.js") as r:
        assert r.status == 200
    await asyncio.sleep(0.05)
    assert not await db.fetchall("SELECT seq FROM audit_log WHERE route LIKE '/console/static%'")
    # Login bodies carry passwords: recorded (who, result) but with no body HMAC.
    async with s.post(f"{skm.mgmt_url}/api/v1/login", json={"name": "admin", "password": "wrong-password-1"}) as r:
        assert r.status == 401
    async with s.post(f"{skm.mgmt_url}/console/login", data={"name": "admin", "password": "wrong-password-2"}) as r:
        await r.read()
    rows = await db.fetchall("SELECT route, detail FROM audit_log WHERE seq > ? AND method = 'POST'", before)
    routes = {r["route"] for r in rows}
    assert "/api/v1/login" in routes and "/console/login" in routes, routes
    assert all("bodyHmac" not in json.loads(r["detail"]) for r in rows), rows
    # Other bodies still get their HMAC.
    st, _ = await skm.mgmt("POST", "/keystores", json={"name": "hmac-still", "description": ""})
    row = await db.fetchone("SELECT detail FROM audit_log WHERE route = '/api/v1/keystores' AND method = 'POST' "
                            "ORDER BY seq DESC LIMIT 1")
    assert json.loads(row["detail"])["bodyHmac"].startswith("hmac-sha256:")


async def _send_unfinished(h, port: int, head: str, body: bytes, timeout: float) -> tuple[int, float]:
    """Send headers and (part of) a body over TLS, never the rest; the status line and how long it took."""
    import time
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=h.ssl(), server_hostname="127.0.0.1")
    t0 = time.monotonic()
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except asyncio.TimeoutError:
            return 0, time.monotonic() - t0           # the server waits for the body: the bug
        return int(line.split()[1]), time.monotonic() - t0
    finally:
        writer.close()


async def test_refused_bodies_are_audited_without_being_read(skm):
    """A request refused before its handler read the body is audited with bodyHmac "not read", at once:
    the audit middleware never reads from the connection (a client that declares 10 GiB and sends 1 KiB
    does not hold the request open), and a complete body that was refused is not fingerprinted either."""
    from server.audit import BODY_NOT_READ
    db = skm.rt.storage
    store = await skm.keystore("unread")
    aes = await skm.key(store, "SYMMETRIC_KEY", "aes")
    before = int(await db.fetchval("SELECT seq FROM audit_head WHERE id = 1"))
    limit = skm.rt.config.body_timeout / 2        # far below the body deadline: nobody waited for the body
    mgmt_port, data_port = skm.server.mgmt_port, skm.server.data_port
    huge = "Content-Type: application/json\r\nContent-Length: 10737418240\r\n\r\n"
    small = b'{"name": "refused-before-read", "description": "unread"}'
    encrypt = f"/keymanager/v1.0/appkey/{skm.appkey}/symmetric-keys/{aes['keyId']}/encrypt"
    cases = {
        # management plane, no operator token: refused before the body is read
        "mgmt 10 GiB declared, 1 KiB sent, no token": (
            mgmt_port, "/api/v1/keystores", f"POST /api/v1/keystores HTTP/1.1\r\nHost: x\r\n{huge}", b"{" * 1024, 401),
        "mgmt small complete body, no token": (
            mgmt_port, "/api/v1/keystores", "POST /api/v1/keystores HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(small)}\r\n\r\n", small, 401),
        # data plane: a declared length over the limit is refused before reading
        "data 10 GiB declared, 1 KiB sent": (
            data_port, "/symmetric-keys/", f"POST {encrypt} HTTP/1.1\r\nHost: x\r\n{huge}", b"{" * 1024, 413),
    }
    seen = {}
    for what, (port, route_part, head, body, expect) in cases.items():
        status, took = await _send_unfinished(skm, port, head, body, limit)
        seen[what] = (status, round(took, 3))
        assert status == expect, f"{what}: got {status or 'no answer'} after {took:.1f} s, expected {expect}"
    await asyncio.sleep(0.05)
    rows = await db.fetchall("SELECT route, status, actor, result, detail FROM audit_log WHERE seq > ? "
                             "AND method = 'POST' ORDER BY seq", before)
    refused = [r for r in rows if r["status"] in (401, 413)]
    assert len(refused) == len(cases), rows
    for r in refused:
        assert json.loads(r["detail"]).get("bodyHmac") == BODY_NOT_READ, r
        assert r["result"] in ("denied", "refused") and r["actor"] == "anonymous", r
    # A body its handler did read is still fingerprinted.
    st, _ = await skm.client("POST", f"/symmetric-keys/{aes['keyId']}/encrypt", json={"plaintext": "read me"})
    assert st == 200
    row = await db.fetchone("SELECT detail FROM audit_log WHERE route LIKE '%/encrypt' AND status = 200 "
                            "ORDER BY seq DESC LIMIT 1")
    assert json.loads(row["detail"])["bodyHmac"].startswith("hmac-sha256:")
    print(f"audit of refused bodies: {seen} (status, seconds); {len(refused)} records with bodyHmac "
          f"{BODY_NOT_READ!r}")
