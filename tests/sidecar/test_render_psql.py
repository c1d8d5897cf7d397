"""The README's example, for real: PostgreSQL's own `psql`, unmodified, reads a `.pgpass` the sidecar
renders, and keeps logging in across a password rotation (a throwaway cluster with scram auth)."""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time

import pytest

from tests.support.postgres import PostgresCluster, skip_reason
from tests.support.sidecar import start_registered_sidecar


async def until(cond, what: str, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
async def cluster():
    why = skip_reason() or (None if shutil.which("psql") else "psql not installed: apt-get install postgresql-client")
    if why:
        pytest.skip(reason=why)
    c = await asyncio.to_thread(PostgresCluster().create)
    try:
        yield c
    finally:
        await asyncio.to_thread(c.destroy)


async def psql(port: int, *, user: str, sql: str, env: dict[str, str]) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        "psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres", "-w", "-X", "-tA", "-c", sql,
        env={"PATH": os.environ["PATH"], **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    return p.returncode, out.decode().strip(), err.decode().strip()


async def test_psql_logs_in_with_a_rendered_pgpass_across_a_rotation(skm, store, cluster, tmp_path):
    admin = {"PGPASSFILE": "/dev/null"}                 # postgres@127.0.0.1 is trusted; app is not
    rc, _, err = await psql(cluster.port, user="postgres", sql="CREATE ROLE app LOGIN PASSWORD 'first-pw-1'",
                            env=admin)
    assert rc == 0, err
    hba = cluster.data_dir / "pg_hba.conf"
    hba.write_text("host all app 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    await asyncio.to_thread(cluster._run, ["pg_ctl", "-D", str(cluster.data_dir), "reload"])

    key = await skm.key(store, "SECRET", "pg-app", secretValue="first-pw-1")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    pgpass = run / "pgpass"
    template = (f"127.0.0.1:{cluster.port}:postgres:app:"
                "{{ secret('apps/pg-app') | replace('\\\\', '\\\\\\\\') | replace(':', '\\\\:') }}\n")
    sc = await start_registered_sidecar(skm, store["keyStoreId"], "pg", render=[
        {"name": "pgpass", "template": template, "destination": str(pgpass), "mode": "0400"}])
    try:
        assert stat.S_IMODE(pgpass.stat().st_mode) == 0o400
        app = {"PGPASSFILE": str(pgpass)}
        # With no password file psql cannot log in (so the rendered file is what lets it in).
        rc, _, err = await psql(cluster.port, user="app", sql="SELECT current_user", env={"PGPASSFILE": "/dev/null"})
        assert rc != 0 and "password" in err
        rc, out, err = await psql(cluster.port, user="app", sql="SELECT current_user", env=app)
        assert (rc, out) == (0, "app"), err

        # Rotation: the database takes the new password, and so does the key server.
        await until(lambda: sc.events.state == "connected", "the event stream")
        rc, _, err = await psql(cluster.port, user="postgres", sql="ALTER ROLE app PASSWORD 'second:pw\\2'",
                                env=admin)
        assert rc == 0, err
        rc, _, err = await psql(cluster.port, user="app", sql="SELECT 1", env=app)
        assert rc != 0 and "password authentication failed" in err          # the old file no longer works
        st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "second:pw\\2"})
        assert st == 200
        took = await until(lambda: "second" in pgpass.read_text(), "the new .pgpass", timeout=3)
        assert took < 1.0
        rc, out, err = await psql(cluster.port, user="app", sql="SELECT current_user", env=app)
        assert (rc, out) == (0, "app"), err
    finally:
        await sc.stop()
