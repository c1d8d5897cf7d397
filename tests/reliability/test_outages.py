"""Outages: the system-key server down at start, the audit log's disk full.

Both must fail closed with a clear reason and recover by themselves.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time

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
