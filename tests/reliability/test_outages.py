"""Outages: the system-key server down at start, the audit log's disk full, PostgreSQL restarted
under load.

All must fail closed with a clear reason and recover by themselves.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass

import aiohttp
import pytest

from tests.reliability.procs import mgmt, setup_store
from tests.reliability.systemkey_env import systemkey_env


async def _probe(srv, s: aiohttp.ClientSession) -> tuple[int, dict]:
    async with s.get(f"{srv.mgmt_url}/api/v1/keystores", headers=srv.bearer()) as r:
        return r.status, await r.json(content_type=None)


async def test_system_key_server_down_at_start_then_unseals_by_itself(tmp_path, server_proc, numbers):
    async with systemkey_env(tmp_path, server_proc, start_systemkey=False) as env:
        srv = env.server
        during: dict[int, int] = {}
        async with srv.session(total=10) as s:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                st, body = await _probe(srv, s)
                during[st] = during.get(st, 0) + 1
                assert st == 503, body                                   # fail closed
                assert body["header"]["resultMessage"] == "Sealed"
                assert "system key" in body["header"].get("resultDetail", "")   # with the reason
                await asyncio.sleep(0.05)
            hst, health = await srv.health()
            assert hst == 503 and health["sealed"] is True
            await env.systemkey.start()
            t1 = time.monotonic()
            await srv.wait_unsealed(20)
            unseal = time.monotonic() - t1
            st, body = await _probe(srv, s)
            assert st == 200, body
    numbers.add("outages", f"system-key server down at start: {sum(during.values())} requests while sealed, "
                           f"statuses {during}; unsealed {unseal:.1f} s after the system-key server came up")


@contextlib.contextmanager
def tiny_tmpfs(path, size: str = "24m"):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(reason="mounting a tmpfs needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path) -> int:
    """Write until the file system is full; returns bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        for size in (2**20, 4096, 512):
            while True:
                try:
                    written += os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return written


async def test_audit_disk_full_fails_closed_and_recovers(tmp_path, server_proc, hygiene, numbers):
    with tiny_tmpfs(tmp_path / "full" / "data"):
        srv = await server_proc("full")
        try:
            await srv.start()
            store = await setup_store(srv, "full")
            filler = srv.config.data_path / "filler"
            statuses: dict[int, int] = {}
            async with srv.session(total=15) as s:
                st, out = await mgmt(s, srv, "POST", f"/keystores/{store['keyStoreId']}/keys",
                                     {"keyType": "SECRET", "name": "before", "secretValue": "value-before-disk-full"})
                assert st == 201, out
                hygiene.secret("value-before-disk-full", "disk-full test secret")
                kid = out["body"]["keyId"]
                await asyncio.to_thread(_fill, filler)
                for i in range(20):
                    async with s.get(srv.client_path(f"/secrets/{kid}")) as r:
                        body = await r.json(content_type=None)
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    assert r.status == 503, (r.status, body)               # no audit record, no secret
                    assert body["header"]["isSuccessful"] is False
                    assert "audit" in (body["header"].get("resultDetail", "") + body["header"]["resultMessage"]).lower()
                st, out = await mgmt(s, srv, "POST", f"/keystores/{store['keyStoreId']}/keys",
                                     {"keyType": "SECRET", "name": "during", "secretValue": "value-during-disk-full"})
                hygiene.secret("value-during-disk-full", "disk-full test secret")
                statuses[st] = statuses.get(st, 0) + 1
                assert st == 503, out
                filler.unlink()
                async with s.get(srv.client_path(f"/secrets/{kid}")) as r:
                    body = await r.json(content_type=None)
                assert r.status == 200 and body["body"]["secret"] == "value-before-disk-full", body
        finally:
            await srv.stop()
            if srv.config.root_key_path().exists():
                await hygiene.harvest(srv.config, "disk-full server")
            srv.harvested = True          # the tmpfs goes away with this block
    numbers.add("outages", f"audit disk full: {sum(statuses.values())} requests during, statuses {statuses}; "
                           "served again once space was freed")


# -- PostgreSQL restarted under load -----------------------------------------------------------
PG_WORKERS = 8
PG_PACE = 0.07           # seconds between one worker's requests


@dataclass
class Sample:
    op: str
    start: float
    end: float
    status: int            # 0: the connection to the key server failed (never expected)
    text: str = ""         # the response of a failed request, checked for clean errors


async def test_postgres_restarted_under_load_fails_cleanly_and_recovers(tmp_path, server_proc, hygiene, numbers):
    """Client reads and management writes against a key server on its own PostgreSQL cluster; the
    cluster is stopped and started again mid-load. During the outage requests fail with a 503 JSON
    envelope (no stack trace, no secret); afterwards every request succeeds without restarting the key
    server, and every acknowledged write is there."""
    from tests.support.postgres import PostgresCluster, skip_reason
    reason = skip_reason()
    if reason:
        pytest.skip(reason=reason)
    with PostgresCluster() as pg:
        srv = await server_proc("pg-restart", storage=pg.create_database())
        try:
            await srv.start()
            ks = (await setup_store(srv, "pg-restart"))["keyStoreId"]
            read_value = "pg-restart-read-" + secrets.token_hex(12)
            hygiene.secret(read_value, "pg restart test secret")
            async with srv.session(total=20) as s:
                st, out = await mgmt(s, srv, "POST", f"/keystores/{ks}/keys",
                                     {"keyType": "SECRET", "name": "read-me", "secretValue": read_value})
                assert st == 201, out
                read_id = out["body"]["keyId"]
            samples: list[Sample] = []
            acked: dict[str, str] = {}            # key id -> value of every acknowledged write
            values: list[str] = [read_value]      # every secret sent, none may appear in a response
            stop = asyncio.Event()

            async def worker(n: int) -> None:
                i = 0
                async with srv.session(total=20) as ws:
                    while not stop.is_set():
                        i += 1
                        t0 = time.monotonic()
                        op, status, text = ("read", 0, "") if i % 2 else ("write", 0, "")
                        try:
                            if op == "read":
                                async with ws.get(srv.client_path(f"/secrets/{read_id}")) as r:
                                    status, text = r.status, await r.text()
                                if status == 200 and json.loads(text)["body"]["secret"] != read_value:
                                    status = -1                         # a wrong value: never expected
                            else:
                                value = f"pg-restart-{n}-{i}-{secrets.token_hex(10)}"
                                hygiene.secret(value, "pg restart test secret")
                                values.append(value)
                                async with ws.post(f"{srv.mgmt_url}/api/v1/keystores/{ks}/keys", headers=srv.bearer(),
                                                   json={"keyType": "SECRET", "name": f"w{n}-{i}", "secretValue": value}
                                                   ) as r:
                                    status, text = r.status, await r.text()
                                if status == 201:
                                    acked[json.loads(text)["body"]["keyId"]] = value
                        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                            status, text = 0, type(e).__name__              # the key server itself failed us
                        ok = status in (200, 201)
                        samples.append(Sample(op, t0, time.monotonic(), status, "" if ok else text))
                        # Paced (each write is a needle for the hygiene check): ~100 requests/s in all.
                        await asyncio.sleep(PG_PACE)

            tasks = [asyncio.create_task(worker(n)) for n in range(PG_WORKERS)]
            try:
                await asyncio.sleep(2.0)
                t_down = time.monotonic()
                await pg.stop_async("fast")                  # disconnects every session of the key server
                await asyncio.sleep(2.0)                     # the outage
                await pg.start_async()
                t_up = time.monotonic()
                deadline = t_up + 20
                while time.monotonic() < deadline and not any(x.start >= t_up and x.status in (200, 201)
                                                              for x in samples):
                    await asyncio.sleep(0.1)
                await asyncio.sleep(3.0)                      # load after recovery
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)

            before = [x for x in samples if x.end < t_down]
            first_ok = min((x.end for x in samples if x.start >= t_up and x.status in (200, 201)), default=None)
            assert first_ok is not None, "no request succeeded within 20 s after PostgreSQL came back"
            after = [x for x in samples if x.start >= first_ok]
            during = [x for x in samples if x.end >= t_down and x.start < first_ok]
            failed = [x for x in samples if x.status not in (200, 201)]
            assert before and all(x.status in (200, 201) for x in before), [x for x in before if x.status >= 300][:5]
            assert len(after) > 20 and all(x.status in (200, 201) for x in after), \
                [(x.op, x.status, x.text[:300]) for x in after if x.status not in (200, 201)][:5]
            assert failed, "no request failed: the outage was not observed"
            statuses: dict[int, int] = {}
            for x in failed:
                statuses[x.status] = statuses.get(x.status, 0) + 1
                assert x.start < first_ok and x.end >= t_down, (x.op, x.status, x.text[:300])
                assert x.status == 503, (x.op, x.status, x.text[:500])
                body = json.loads(x.text)                    # a JSON envelope
                assert body["header"]["isSuccessful"] is False and body["body"] is None, body
                assert "Traceback" not in x.text and 'File "' not in x.text and "asyncpg" not in x.text, x.text
                assert not any(v in x.text for v in values), "a secret value in an error response"
            log = srv.log_text()
            assert "Traceback" not in log, "the outage logged a stack trace:\n" + log[log.find("Traceback"):][:3000]

            async with srv.session() as s:
                for key_id, value in acked.items():
                    async with s.get(srv.client_path(f"/secrets/{key_id}")) as r:
                        out = await r.json(content_type=None)
                    assert r.status == 200 and out["body"]["secret"] == value, (key_id, r.status, out.get("header"))
                st, chain = await mgmt(s, srv, "GET", "/audit/verify")   # failed batches rolled back whole
                assert st == 200 and chain["body"]["ok"] is True, chain
            recovery = first_ok - t_up
            await srv.stop()
            await hygiene.harvest(srv.config, "pg restart server")          # before the cluster goes away
        finally:
            await srv.stop()
            srv.harvested = True          # the cluster (and so the database) goes away with this block
    numbers.add("outages", f"PostgreSQL restarted under load: {len(before)} requests ok before, {len(during)} "
                           f"during the outage ({len(failed)} failed, statuses {statuses}), first success "
                           f"{recovery:.2f} s after PostgreSQL was up, {len(after)} ok after (0 failed); "
                           f"{len(acked)} acknowledged writes all present, audit chain intact "
                           f"({chain['body']['checked']} records)")
    print(f"outages: PostgreSQL restart: ok before {len(before)}, during {len(during)} ({len(failed)} failed, "
          f"{statuses}), recovered {recovery:.2f} s after start, ok after {len(after)}, acked writes {len(acked)}")
