"""Several key-server replicas on one PostgreSQL database, as separate processes.

What users of a replicated deployment rely on: a write on one replica is read
on another at once; background jobs (purge, auto-rotation) run on one replica
at a time and move to a survivor when the holder dies; key-change events reach
every replica's event stream; killing a replica with -9 under load loses no
acknowledged write and reads go on through the other.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import aiohttp

from server import timeutil
from server.access.pki import DevPKI
from sidecar.app import Sidecar
from tests.replicas.conftest import ReplicaSet
from tests.support.sidecar import issue_host_cert, sidecar_config, unix_session


async def _start(rs: ReplicaSet, *which) -> None:
    for r in which:
        r.start()
    for r in which:
        await r.wait_ready(rs.ca)


def _past() -> str:
    return timeutil.to_db(timeutil.now() - dt.timedelta(days=1))


async def test_write_on_one_replica_is_read_on_the_other_at_once(replicas: ReplicaSet):
    rs = replicas
    await _start(rs, rs.a, rs.b)
    ks = await rs.keystore(rs.a, "shared")
    sid = await rs.key(rs.a, ks, "SECRET", "db-password", secretValue="v0")
    sym = await rs.key(rs.b, ks, "SYMMETRIC_KEY", "aes")
    for i in range(1, 11):
        writer, reader = (rs.a, rs.b) if i % 2 else (rs.b, rs.a)
        st, out = await rs.client(writer, "PUT", f"/secrets/{sid}", {"secretValue": f"v{i}"})
        assert st == 200, out
        st, out = await rs.client(reader, "GET", f"/secrets/{sid}")
        assert st == 200 and out["body"]["secret"] == f"v{i}", (i, out)
    # A ciphertext made on one replica decrypts on the other, also after a rotation made there.
    st, enc = await rs.client(rs.a, "POST", f"/symmetric-keys/{sym}/encrypt", {"plaintext": "hello"})
    assert st == 200, enc
    st, out = await rs.mgmt(rs.b, "POST", f"/keys/{sym}/rotate")
    assert st == 200, out
    st, enc2 = await rs.client(rs.a, "POST", f"/symmetric-keys/{sym}/encrypt", {"plaintext": "again"})
    assert st == 200 and enc2["body"]["keyVersion"] == 1, enc2
    for c, text in ((enc, "hello"), (enc2, "again")):
        st, dec = await rs.client(rs.b, "POST", f"/symmetric-keys/{sym}/decrypt",
                                  {"ciphertext": c["body"]["ciphertext"]})
        assert st == 200 and dec["body"]["plaintext"] == text, dec


async def test_background_jobs_run_on_one_replica_and_move_to_the_survivor(replicas: ReplicaSet):
    rs = replicas
    await _start(rs, rs.a)
    assert await rs.wait_job_holder([rs.a]) is rs.a
    await _start(rs, rs.b)
    ks = await rs.keystore(rs.b, "jobs")
    # A key whose deletion is due: only the job holder purges it.
    doomed = await rs.key(rs.b, ks, "SECRET", "doomed", secretValue="x")
    st, out = await rs.mgmt(rs.b, "POST", f"/keys/{doomed}/schedule-deletion")
    assert st == 200, out
    for _ in range(20):   # the lock stays put while both live
        assert await rs.job_holder() is rs.a
        await asyncio.sleep(0.05)
    await rs.sql("UPDATE keys SET deletion_at = $1 WHERE id = $2", _past(), doomed)
    await _until(lambda: _gone(rs, doomed), "the due key was not purged")
    # jobs_ran is logged only by a run that did something.
    assert len(rs.a.log_events("jobs_ran")) == 1
    assert rs.b.log_events("jobs_ran") == []

    rs.a.kill9()
    assert await rs.wait_job_holder([rs.b], timeout=10) is rs.b
    # Auto-rotation that falls due after the failover is done by the survivor.
    sym = await rs.key(rs.b, ks, "SYMMETRIC_KEY", "rotating")
    await rs.sql("UPDATE keys SET next_rotation_at = $1 WHERE id = $2", _past(), sym)

    async def rotated() -> bool:
        st, out = await rs.mgmt(rs.b, "GET", f"/keys/{sym}")
        return st == 200 and out["body"]["currentKeyValueVersion"] == 1

    await _until(rotated, "the survivor did not rotate the due key")
    assert len(rs.b.log_events("jobs_ran")) == 1


async def _gone(rs: ReplicaSet, key_id: str) -> bool:
    rows = await rs.sql("SELECT 1 FROM keys WHERE id = $1", key_id)
    return not rows


async def _until(check, message: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(message)


async def _read_events(resp: aiohttp.ClientResponse, into: list[dict]) -> None:
    kind = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind:
            into.append({"event": kind, **json.loads(line[6:])})
            kind = None


async def test_key_change_events_reach_every_replicas_stream(replicas: ReplicaSet, tmp_path: Path):
    rs = replicas
    await _start(rs, rs.a, rs.b)
    host = issue_host_cert(DevPKI(rs.a.data_dir / "pki").load_ca(), tmp_path, "events-host")
    s = rs.session(host.cert, host.key)
    ks = await rs.keystore(rs.a, "evented")
    sid = await rs.key(rs.a, ks, "SECRET", "s", secretValue="v0")
    heard: dict[str, list[dict]] = {"a": [], "b": []}
    readers = []
    for r in rs.all:
        resp = await s.get(f"{r.data_url}/keymanager/v1.0/appkey/{rs.init.appkey}/events",
                           timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
        assert resp.status == 200, await resp.text()
        readers.append((resp, asyncio.create_task(_read_events(resp, heard[r.name]))))
    try:
        await _until(lambda: _has(heard, "hello"), "streams did not open")
        st, out = await rs.client(rs.a, "PUT", f"/secrets/{sid}", {"secretValue": "v1"})
        assert st == 200, out
        st, out = await rs.mgmt(rs.b, "POST", f"/keys/{sid}/rotate", {"secretValue": "v2"})
        assert st == 200, out
        for name in ("a", "b"):   # each replica's stream tells both changes, made on either replica
            await _until(lambda: _versions(heard[name], sid, 2),
                         f"replica {name}'s stream missed a change: {heard[name]}", timeout=5)
            ours = [(e["event"], e["version"]) for e in heard[name] if e.get("key_id") == sid]
            assert ours == [("secret_updated", 1), ("secret_updated", 2)], ours   # once each, in order
    finally:
        for resp, task in readers:
            task.cancel()
            resp.close()


async def _has(heard: dict[str, list[dict]], kind: str) -> bool:
    return all(any(e["event"] == kind for e in evs) for evs in heard.values())


async def _versions(events: list[dict], key_id: str, n: int) -> bool:
    return len([e for e in events if e.get("key_id") == key_id]) >= n


async def test_kill9_under_load_through_sidecars(replicas: ReplicaSet, tmp_path: Path):
    """Writers and readers through two sidecars; the replica the sidecars prefer (and the job
    holder) is killed -9 mid-run: no acknowledged write is lost, reads go on, jobs move."""
    rs = replicas
    await _start(rs, rs.a)
    assert await rs.wait_job_holder([rs.a]) is rs.a
    await _start(rs, rs.b)
    ks = await rs.keystore(rs.a, "loaded")
    writers = 4
    wkeys = [await rs.key(rs.a, ks, "SECRET", f"w{i}", secretValue=f"w{i}-0") for i in range(writers)]
    stable = await rs.key(rs.a, ks, "SECRET", "stable", secretValue="never changes")

    ca = DevPKI(rs.a.data_dir / "pki").load_ca()
    key_id, secret = await rs.access_key(rs.a)
    secret_file = tmp_path / "uak-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    sidecars = []
    for n in range(2):
        host = issue_host_cert(ca, tmp_path, f"host{n}")
        cfg = sidecar_config(appkey=rs.init.appkey, urls=[rs.a.data_url, rs.b.data_url], ca=rs.ca, host=host,
                             socket=tmp_path / f"sc{n}.sock",
                             upstream={"api_version": "v1.2", "user_access_key_id": key_id,
                                       "user_access_key_secret_file": str(secret_file)})
        sidecars.append(await Sidecar(cfg).start())
    sessions = [unix_session(tmp_path / f"sc{n}.sock") for n in range(2)]
    acked = [0] * writers             # last value each writer saw acknowledged
    attempted = [0] * writers         # last value each writer sent
    failures: list[tuple[str, float, str]] = []
    ok_reads_after_kill = 0
    kill_at: float | None = None
    stop_at = time.monotonic() + 8.0

    async def writer(i: int) -> None:
        s = sessions[i % 2]
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            attempted[i] = n
            started = time.monotonic()
            try:
                async with s.put(f"/secrets/{wkeys[i]}", json={"secretValue": f"w{i}-{n}"},
                                 timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.json(content_type=None)
                    if r.status == 200 and body["header"]["isSuccessful"]:
                        acked[i] = n
                    else:
                        failures.append(("write", started, body["header"]["resultMessage"]))
            except aiohttp.ClientError as e:
                failures.append(("write", started, type(e).__name__))

    async def reader(j: int) -> None:
        nonlocal ok_reads_after_kill
        s = sessions[j % 2]
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            key = stable if n % 2 else wkeys[n % writers]
            started = time.monotonic()
            try:
                async with s.get(f"/secrets/{key}", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.json(content_type=None)
                    if r.status == 200:
                        if kill_at is not None and started > kill_at:
                            ok_reads_after_kill += 1
                    else:
                        failures.append(("read", started, body["header"]["resultMessage"]))
            except aiohttp.ClientError as e:
                failures.append(("read", started, type(e).__name__))

    async def killer() -> None:
        nonlocal kill_at
        await asyncio.sleep(3.0)
        kill_at = time.monotonic()
        rs.a.kill9()

    try:
        await asyncio.gather(*(writer(i) for i in range(writers)), *(reader(j) for j in range(4)), killer())
        assert kill_at is not None
        # Reads never fail (GETs are retried on the other replica); a write fails only if it was
        # in flight on the dead replica when it died: at most one per writer, started before the kill.
        read_failures = [f for f in failures if f[0] == "read"]
        write_failures = [f for f in failures if f[0] == "write"]
        assert read_failures == [], read_failures
        assert len(write_failures) <= writers, write_failures
        assert all(started <= kill_at + 0.05 for _, started, _ in write_failures), (kill_at, write_failures)
        assert ok_reads_after_kill > 50, ok_reads_after_kill
        assert all(a > 10 for a in acked), acked
        # No acknowledged write lost: the survivor holds each writer's last acknowledged value,
        # or a later one that was in flight when the replica died.
        for i, key in enumerate(wkeys):
            st, out = await rs.client(rs.b, "GET", f"/secrets/{key}")
            assert st == 200, out
            final = int(out["body"]["secret"].rsplit("-", 1)[1])
            assert acked[i] <= final <= attempted[i], (i, acked[i], final, attempted[i])
        assert await rs.wait_job_holder([rs.b], timeout=10) is rs.b
    finally:
        for s in sessions:
            await s.close()
        for sc in sidecars:
            await sc.stop()
