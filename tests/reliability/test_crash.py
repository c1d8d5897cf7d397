"""kill -9 of `skm server run` in the middle of a write load, then restart.

Each writer owns its keys and writes them one after the other (create a SECRET,
then rotate it with new values), so for every key the acknowledged history is
exact: after the restart every acknowledged write is there and readable through
the client API, the current value is the last acknowledged one (or the one in flight
when the process died), and every stored version of every key opens under the
barrier (no half-written record). SQLite and PostgreSQL.
"""
from __future__ import annotations

import asyncio
import secrets
import subprocess
import time

import aiohttp
import pytest

from tests.reliability.hygiene import Hygiene
from tests.reliability.procs import SKM, ServerProcess, mgmt, setup_store

WRITERS = 8
LOAD_SECONDS = 2.0


def _storage_backends():
    from tests.support.postgres import skip_reason
    pg = skip_reason()
    return ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(pg is not None, reason=pg or ""))]


class Writer:
    def __init__(self, n: int) -> None:
        self.n = n
        self.acked: dict[str, list[str]] = {}      # key id -> acknowledged values, in order
        self.in_flight: tuple[str | None, str] | None = None
        self.count = 0

    async def run(self, s: aiohttp.ClientSession, srv: ServerProcess, ks: int, hygiene: Hygiene) -> None:
        i = 0
        while True:
            i += 1
            value = f"crash-{self.n}-{i}-{secrets.token_hex(12)}"
            hygiene.secret(value, "crash test secret value")
            key = next(reversed(self.acked), None) if self.acked and i % 4 else None
            self.in_flight = (key, value)
            try:
                if key is None:
                    st, out = await mgmt(s, srv, "POST", f"/keystores/{ks}/keys",
                                         {"keyType": "SECRET", "name": f"w{self.n}-{i}", "secretValue": value})
                    assert st == 201, out
                    self.acked[out["body"]["keyId"]] = [value]
                else:
                    st, out = await mgmt(s, srv, "POST", f"/keys/{key}/rotate", {"secretValue": value})
                    assert st == 200, out
                    self.acked[key].append(value)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return                      # the server died under us: this write was not acknowledged
            self.in_flight = None
            self.count += 1


@pytest.mark.parametrize("backend", _storage_backends())
async def test_kill_9_loses_no_acknowledged_write(backend, server_proc, hygiene, numbers, request):
    storage = None
    with contextlib_database(backend, request) as storage:
        srv = await server_proc(f"crash-{backend}", storage=storage)
        await srv.start()
        ks = (await setup_store(srv, "crash"))["keyStoreId"]
        writers = [Writer(n) for n in range(WRITERS)]
        async with srv.session(limit=WRITERS * 2, total=10) as s:
            tasks = [asyncio.create_task(w.run(s, srv, ks, hygiene)) for w in writers]
            await asyncio.sleep(LOAD_SECONDS)
            rss = srv.rss()
            srv.kill()                                   # SIGKILL mid-load
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        acked = sum(w.count for w in writers)
        in_flight = sum(1 for w in writers if w.in_flight)
        assert acked > 20, "the load did not get going before the kill"
        t0 = time.monotonic()
        await srv.start()
        restart = time.monotonic() - t0
        checked = await verify(srv, writers, ks)
        versions = await Hygiene().harvest(srv.config, "crash check")   # every stored version opens
        audit = await audit_verify(srv)
        await srv.stop()
        await hygiene.harvest(srv.config, f"crash {backend}")    # before the database goes away
        srv.harvested = True
        numbers.add("crash", f"{backend}: {acked} writes acknowledged before kill -9 (rss {rss // 2**20} MiB), "
                             f"{in_flight} in flight; after restart ({restart:.1f} s) {checked} keys checked, "
                             f"{versions} stored versions open, audit verify: {audit}")


class contextlib_database:
    """A fresh PostgreSQL database for the postgresql backend; nothing for SQLite."""

    def __init__(self, backend: str, request) -> None:
        self.backend, self.request, self._cm = backend, request, None

    def __enter__(self) -> str | None:
        if self.backend != "postgresql":
            return None
        from tests.support.postgres import session_cluster
        self._cm = session_cluster(self.request.config).database()
        return self._cm.__enter__()

    def __exit__(self, *exc) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


async def verify(srv: ServerProcess, writers: list[Writer], ks: int) -> int:
    checked = 0
    async with srv.session() as s:
        for w in writers:
            for key_id, values in w.acked.items():
                async with s.get(srv.client_path(f"/secrets/{key_id}")) as r:
                    out = await r.json(content_type=None)
                assert r.status == 200, (key_id, out)
                allowed = {values[-1]}
                if w.in_flight and w.in_flight[0] == key_id:
                    allowed.add(w.in_flight[1])          # the write in flight may or may not have landed
                assert out["body"]["secret"] in allowed, f"{key_id}: lost an acknowledged write"
                st, meta = await mgmt(s, srv, "GET", f"/keys/{key_id}")
                assert st == 200, meta
                versions = {v["keyVersion"] for v in meta["body"].get("versions") or []}
                # versions 0..n-1 for n acknowledged values are all there
                assert set(range(len(values))) <= versions, (key_id, versions, len(values))
                checked += 1
            # An unacknowledged create may have landed: if so it is whole and readable.
            if w.in_flight and w.in_flight[0] is None:
                st, listing = await mgmt(s, srv, "GET", f"/keystores/{ks}/keys")
                assert st == 200
    return checked


async def audit_verify(srv: ServerProcess) -> str:
    """`skm audit verify` against the restarted server, when the audit module is there."""
    from importlib.util import find_spec
    if find_spec("server.cli.cmd_audit") is None:
        return "no audit module yet"
    env = {**srv.env, "SKM_TOKEN": srv.token}
    args = [str(SKM), "audit", "verify", "--addr", srv.mgmt_url, "--ca", str(srv.ca)]
    proc = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, env=env, timeout=120,
                                   cwd=srv.tmp)
    assert proc.returncode == 0, f"skm audit verify failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return "passed"

