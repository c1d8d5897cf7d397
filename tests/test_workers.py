"""`skm server run --workers N`: several real processes on one data port (SO_REUSEPORT).

What a user relies on: connections reach every worker; a change made through the
management plane (worker 0) counts on the very next request a *different* worker
answers, on a connection that stayed open; the audit chain stays linear with
every worker writing; a worker that dies comes back; one that cannot start stops
the group with a clear error instead of a restart loop; SIGTERM leaves no process.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from server.config import load
from server.init import init_server
from server.metrics import FLUSH_SECONDS
from server.settings import ServerConfig
from tests.support.server import Harness, metric_sum, scrape

SKM = [sys.executable, "-c", "import sys; from server.cli.main import main; sys.exit(main())"]
READY = re.compile(r"data plane https://[\d.]+:(\d+), management https://[\d.]+:(\d+) \((\d+) workers\)")


def write_config(tmp: Path, workers: int, storage: str = "") -> Path:
    cfg = tmp / "server.toml"
    store = f'storage = "{storage}"\n' if storage.startswith("postgresql") else ""
    cfg.write_text(f'data_dir = "{tmp / "data"}"\n{store}log_format = "json"\nlog_level = "info"\n'
                   f"purge_interval = 3600.0\nworkers = {workers}\n[data]\nport = 0\n[mgmt]\nport = 0\n")
    return cfg


@dataclass
class Group:
    """The supervisor process, seen as the harness's `server`."""
    proc: subprocess.Popen
    config: ServerConfig
    data_port: int
    mgmt_port: int
    log: Path

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    async def stop(self) -> None:
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in kids:            # nothing may outlive the supervisor; kill leftovers so the run stays clean
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def start_group(tmp: Path, workers: int = 2, env: dict | None = None, storage: str = "") -> Group:
    cfg_path = write_config(tmp, workers, storage)
    cfg = load(ServerConfig, cfg_path, env={})
    log = tmp / "server.log"
    proc = subprocess.Popen([*SKM, "server", "run", "--config", str(cfg_path)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = READY.search(log.read_text(errors="replace"))
        if m:
            return Group(proc, cfg, int(m.group(1)), int(m.group(2)), log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"workers did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


@pytest.fixture
async def group(tmp_path, request):
    # Events between workers: Unix datagrams on SQLite, LISTEN/NOTIFY on PostgreSQL.
    storage = request.getfixturevalue("storage_url") if "storage_url" in request.fixturenames else ""
    cfg = load(ServerConfig, write_config(tmp_path, 2, storage), env={})
    init = await init_server(cfg)
    g = start_group(tmp_path, storage=storage)
    h = Harness(g, init, tmp_path)     # the harness's helpers, pointed at the supervisor's ports
    try:
        yield h
    finally:
        await h.close()
        assert not [p for p in g.children() if _alive(p)]


async def worker_of(session: aiohttp.ClientSession, h: Harness) -> int:
    async with session.get(f"{h.data_url}/healthz") as r:
        return (await r.json())["worker"]


async def session_on_worker(h: Harness, want: int, tries: int = 60) -> aiohttp.ClientSession:
    """A keep-alive session (one connection) whose connection the kernel gave to worker `want`."""
    for _ in range(tries):
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=h.ssl(), limit=1))
        if await worker_of(s, h) == want:
            h.sessions.append(s)
            return s
        await s.close()
    raise AssertionError(f"no connection reached worker {want} in {tries} tries")


async def test_workers_share_the_port_and_hear_each_others_changes(storage_url, group: Harness):
    h = group
    seen = set()
    for _ in range(40):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=h.ssl(), force_close=True)) as s:
            seen.add(await worker_of(s, h))
        if seen == {0, 1}:
            break
    assert seen == {0, 1}, f"new connections reached only worker(s) {seen}"
    assert h.server.log.read_text().count('"event_loop": "uvloop"') == 2      # the default loop, both workers

    store = await h.keystore("spread")
    key = await h.key(store, "SECRET", "db-password", secretValue="first value")
    w1 = await session_on_worker(h, 1)
    st, out = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    assert st == 200 and out["body"]["secret"] == "first value"

    # A new value made through worker 0 is what worker 1 serves next, on the same connection.
    st, out = await h.mgmt("POST", f"/keys/{key['keyId']}/rotate",
                           json={"secretValue": "second value"})
    assert st == 200, out
    st, out = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    assert st == 200 and out["body"]["secret"] == "second value"

    # Scheduling the store's only IPv4 entry for deletion cuts worker 1's open connection off at once.
    st, out = await h.mgmt("POST", f"/keystores/{store['keyStoreId']}/auths/ipv4s/schedule-deletion",
                           json={"value": "127.0.0.1"})
    assert st == 200, out
    assert await worker_of(w1, h) == 1                     # still the same worker and connection
    st, out = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    assert st == 403 and out["header"]["isSuccessful"] is False, out

    # Both workers wrote audit records concurrently; the chain is one line.
    async def read(i):
        return await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    await asyncio.gather(*(read(i) for i in range(20)))
    st, out = await h.mgmt("GET", "/audit/verify")
    assert st == 200 and out["body"]["ok"] is True, out
    assert out["body"]["checked"] > 25

    # On PostgreSQL the workers chain after their shared tip (server/audit/tip.py): it names the last
    # record written. SQLite's workers take turns on the writer lock and keep none.
    tip = h.server.config.data_path / "run" / "audit-tip"
    if not storage_url.startswith("postgresql"):
        assert not tip.exists()
        return
    import asyncpg
    conn = await asyncpg.connect(storage_url)
    try:
        for _ in range(100):        # a batch still on its way is named before it lands
            seq, digest = struct.unpack("<Q64s", tip.read_bytes())
            stored = await conn.fetchval("SELECT hash FROM audit_log WHERE seq = $1", seq)
            if stored is not None:
                break
            await asyncio.sleep(0.02)
        assert seq > out["body"]["checked"] and stored == digest.decode()
    finally:
        await conn.close()
    assert oct(tip.stat().st_mode & 0o777) == "0o600"


async def test_a_revoked_credential_is_refused_by_every_worker_on_the_next_request(storage_url, group: Harness):
    """Verified tokens and access keys are cached per worker; a revocation made through one worker (or the
    management plane) is refused by the other on its very next request, on a connection that stayed open."""
    import base64
    h = group
    store = await h.keystore("tokens")
    key = await h.key(store, "SECRET", "s", secretValue="behind a token")
    st, out = await h.mgmt("POST", "/access-keys", json={"description": "workers"})
    assert st == 201, out
    key_id, secret = out["body"]["accessKeyId"], out["body"]["secretAccessKey"]
    basic = {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}
    v12 = {"X-TC-AUTHENTICATION-ID": key_id, "X-TC-AUTHENTICATION-SECRET": secret}
    w = {i: await session_on_worker(h, i) for i in (0, 1)}

    async def token(on: int) -> str:
        async with w[on].post(f"{h.data_url}/oauth2/token/create", data={"grant_type": "client_credentials"},
                              headers=basic) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["access_token"]

    async def read(on: int, headers: dict, version: str = "v1.3") -> int:
        st, out = await h.client("GET", f"/secrets/{key['keyId']}", version=version, session=w[on], headers=headers)
        assert (st == 200) == (out["header"]["isSuccessful"] is True), out
        return st

    for revoker, other in ((0, 1), (1, 0)):
        tok = await token(other)
        bearer = {"X-NHN-Authorization": f"Bearer {tok}"}
        for _ in range(3):                         # verified once, then served from each worker's memory
            assert await read(0, bearer) == 200 and await read(1, bearer) == 200
        async with w[revoker].post(f"{h.data_url}/oauth2/token/revoke", data={"token": tok}, headers=basic) as r:
            assert r.status == 200, await r.text()
        assert await worker_of(w[other], h) == other          # the same connection, the same worker
        assert await read(other, bearer) == 401
        assert await read(revoker, bearer) == 401

    # An access key deleted on the management plane (worker 0): the key and its tokens end on worker 1 too.
    tok = await token(1)
    bearer = {"X-NHN-Authorization": f"Bearer {tok}"}
    assert await read(1, bearer) == 200 and await read(1, v12, "v1.2") == 200
    st, out = await h.mgmt("DELETE", f"/access-keys/{key_id}")
    assert st == 200, out
    assert await read(1, bearer) == 401 and await read(1, v12, "v1.2") == 401

    # An operator disabled on the management plane: their access key stops at once on worker 1.
    st, out = await h.mgmt("POST", "/operators", json={"name": "carol", "role": "admin"})
    assert st == 201, out
    st, out = await h.mgmt("POST", "/access-keys", json={"operator": "carol", "description": "carol's"})
    assert st == 201, out
    carol = {"X-TC-AUTHENTICATION-ID": out["body"]["accessKeyId"],
             "X-TC-AUTHENTICATION-SECRET": out["body"]["secretAccessKey"]}
    assert await read(1, carol, "v1.2") == 200 and await read(1, carol, "v1.2") == 200
    st, out = await h.mgmt("PATCH", "/operators/carol", json={"disabled": True})
    assert st == 200, out
    assert await read(1, carol, "v1.2") == 401


async def test_a_new_system_key_version_reaches_every_worker(group: Harness):
    """`skm barrier refresh` lands on worker 0; worker 1 must open what worker 0 seals under the new version."""
    from server.barrier.keyring import add_version, load_keyring_file, save_keyring_file
    from server.barrier.providers import make_provider
    h = group
    cfg = h.server.config
    root = make_provider(cfg.rootkey, cfg.root_key_path())
    try:
        ring = load_keyring_file(cfg.system_key_path())
        new = await add_version(ring, root)
        save_keyring_file(cfg.system_key_path(), ring)
    finally:
        await root.close()
    store = await h.keystore("after-rotation")
    w1 = await session_on_worker(h, 1)
    st, out = await h.mgmt("POST", "/system/keyring/refresh")
    assert st == 200 and out["body"]["currentVersion"] == new, out
    key = await h.key(store, "SECRET", "sealed-under-new", secretValue="only readable with the new version")
    st, out = await h.mgmt("GET", "/system/status")
    assert out["body"]["recordsByVersion"].get(str(new), 0) >= 1        # worker 0 sealed it under the new one
    st, out = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    assert st == 200 and out["body"]["secret"] == "only readable with the new version", out
    assert "keyring_followed" in h.server.log.read_text()


async def test_a_dead_worker_is_restarted(group: Harness):
    g: Group = group.server
    before = g.children()
    assert len(before) == 2
    # Worker 1 is the one started second; kill it the hard way.
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = [p for p in g.children() if _alive(p)]
        if len(kids) == 2 and victim not in kids and "worker_restarted" in g.log.read_text():
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"worker not restarted; log:\n{g.log.read_text()[-2000:]}")
    assert "worker 1 exited with status -9; restarting" in g.log.read_text()
    s = await session_on_worker(group, 1)          # and the new one serves
    assert await worker_of(s, group) == 1


async def test_worker_0_dies_and_the_others_go_on_auditing(group: Harness):
    """Every worker writes its own audit records: while worker 0 is gone worker 1 goes on (the chain
    stays one line), and once it is back both do."""
    h = group
    g: Group = h.server
    store = await h.keystore("writer-gone")
    key = await h.key(store, "SECRET", "s", secretValue="audited")
    w1 = await session_on_worker(h, 1)
    st, _ = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
    assert st == 200
    w0 = min(g.children())                   # worker 0 starts first
    os.kill(w0, signal.SIGKILL)
    # Wait until the supervisor has reaped it: every thread gone, its sockets closed by the kernel. (A
    # request in flight at that moment fails closed: its record may have been lost with worker 0.)
    deadline = time.monotonic() + 10
    while "worker 0 exited with status -9" not in g.log.read_text():
        assert time.monotonic() < deadline, g.log.read_text()[-2000:]
        await asyncio.sleep(0.02)
    for _ in range(10):                      # answered (and audited) by worker 1 alone meanwhile
        st, out = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
        assert st == 200 and out["body"]["secret"] == "audited", out
    deadline = time.monotonic() + 30
    while "worker_restarted" not in g.log.read_text():
        assert time.monotonic() < deadline, g.log.read_text()[-2000:]
        await asyncio.sleep(0.2)
    for _ in range(10):
        st, _ = await h.client("GET", f"/secrets/{key['keyId']}", session=w1)
        assert st == 200
    # The new worker 0 listens on a new management port (the config says port 0).
    import json
    ports = [json.loads(line)["mgmt_port"] for line in g.log.read_text().splitlines()
             if line.startswith("{") and '"listening"' in line and '"worker": 0' in line]
    g.mgmt_port = ports[-1]
    st, out = await h.mgmt("GET", "/audit/verify")
    assert st == 200 and out["body"]["ok"] is True, out
    n = await h.mgmt("GET", "/audit?action=secret.read&limit=100")
    assert n[0] == 200 and len(n[1]["body"]["records"]) >= 21, n


async def test_metrics_add_up_every_workers_requests(group: Harness):
    """A scrape reaches one worker, but counts what every worker did: 5 reads on worker 0 and 8 on
    worker 1 are 13 whichever worker (or the management plane) answers, once the other worker has
    flushed (within `FLUSH_SECONDS`), and still 13 after worker 1 died and came back (a counter never
    goes down)."""
    h = group
    g: Group = h.server
    store = await h.keystore("metered")
    key = await h.key(store, "SECRET", "s", secretValue="counted")
    sessions = {i: await session_on_worker(h, i) for i in (0, 1)}
    for i, n in ((0, 5), (1, 8)):
        for _ in range(n):
            st, _ = await h.client("GET", f"/secrets/{key['keyId']}", session=sessions[i])
            assert st == 200
    route = "/keymanager/{version}/appkey/{appkey}/secrets/{keyid}"

    async def reads_counted() -> list[float]:
        texts = [await scrape(sessions[i], f"{h.data_url}/metrics") for i in (0, 1)]
        texts.append(await scrape(h._default(), f"{h.mgmt_url}/metrics"))
        assert all(metric_sum(t, "skm_sealed") == 0 for t in texts)
        assert all(metric_sum(t, "skm_audit_records_total") >= 13 for t in texts)
        return [metric_sum(t, "skm_http_requests_total", plane="data", route=route, status="200") for t in texts]

    async def settled() -> list[float]:
        deadline = time.monotonic() + 5 * FLUSH_SECONDS
        while (seen := await reads_counted()) != [13, 13, 13] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return seen
    assert await settled() == [13, 13, 13]
    assert await worker_of(sessions[1], h) == 1            # both scrapes were answered by their own worker

    victim = max(g.children())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "worker_restarted" not in g.log.read_text():
        assert time.monotonic() < deadline, g.log.read_text()[-2000:]
        await asyncio.sleep(0.2)
    sessions[1] = await session_on_worker(h, 1)
    assert await settled() == [13, 13, 13]


async def test_sigterm_leaves_no_process(group: Harness):
    """SIGTERM to the supervisor stops every worker it started, not just itself.

    The pids are taken before the signal: once the supervisor is gone its children list is gone
    too, and orphaned workers (what a `Supervisor.stop()` that did nothing would leave) would be
    re-parented, still alive, and this check sees them.
    """
    g: Group = group.server
    pids = [p for p in g.children() if _alive(p)]
    assert len(pids) == 2, pids
    g.proc.send_signal(signal.SIGTERM)
    try:
        assert g.proc.wait(30) == 0, g.log.read_text()[-2000:]
        left = [p for p in pids if _alive(p)]
        assert not left, f"workers {left} outlived the supervisor"
    finally:
        for pid in pids:            # a failing run must not leave workers behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_worker_that_cannot_start_stops_the_group(tmp_path):
    cfg = load(ServerConfig, write_config(tmp_path, 2), env={})
    await init_server(cfg)
    (tmp_path / "data" / "root.key").chmod(0o644)          # refused: others could read the root key
    with pytest.raises(AssertionError, match="did not come up"):
        start_group(tmp_path)
    text = (tmp_path / "server.log").read_text()
    assert "worker 0 exited with status" in text and "before it was ready" in text
    assert "restarting" not in text


def test_run_help_names_workers():
    out = subprocess.run([*SKM, "server", "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--workers" in out and "SO_REUSEPORT" in out


def test_the_supervisor_does_not_load_the_server():
    """The supervisor only starts and watches workers: importing its module must not bring aiohttp or
    prometheus_client (the shared metrics directory's name lives in server/workers.py for this)."""
    probe = ("import sys, server.workers; "
             "print(sorted(m for m in ('aiohttp', 'prometheus_client', 'server.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]", out
