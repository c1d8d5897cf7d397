"""Key-server replicas as real processes (`skm server run`) on one throwaway PostgreSQL database.

`replicas` yields a `ReplicaSet`: the shared data dir (root key, system key,
PKI) made once by init_server, two replicas `a` and `b` (not started: tests
choose the order), TLS sessions to either, and SQL on the database itself.
Every process is killed and every temp file removed afterwards.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import asyncpg
import pytest

from server.access.tls import client_context
from server.config import load
from server.init import InitResult, init_server
from server.settings import ServerConfig
from server.storage.postgres import lock_key
from tests.support.postgres import free_port

REPO = Path(__file__).resolve().parents[2]
JOBS_LOCK = "skm-jobs"


@dataclass
class Replica:
    name: str
    base: Path
    data_dir: Path
    storage: str
    purge_interval: float
    data_port: int = field(default_factory=free_port)
    mgmt_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.base / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    @property
    def data_url(self) -> str:
        return f"https://127.0.0.1:{self.data_port}"

    @property
    def mgmt_url(self) -> str:
        return f"https://127.0.0.1:{self.mgmt_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self) -> None:
        self.config_path.write_text(
            f'data_dir = "{self.data_dir}"\nstorage = "{self.storage}"\n'
            f"purge_interval = {self.purge_interval}\nlog_format = \"json\"\nlog_level = \"info\"\n"
            f'[data]\nhost = "127.0.0.1"\nport = {self.data_port}\n'
            f'[mgmt]\nhost = "127.0.0.1"\nport = {self.mgmt_port}\n')

    def start(self) -> None:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_")}
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli.main", "server", "run", "--config", str(self.config_path)],
                cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    async def wait_ready(self, ca: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(ca))) as s:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"replica {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with s.get(f"{self.mgmt_url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"replica {self.name} not ready in {timeout}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"replica {self.name} is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_events(self, event: str) -> list[dict]:
        """The JSON log records this replica wrote with that `event` name."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("event") == event:
                        out.append(rec)
        return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    return out


def owner_of_local_port(port: int, replicas: list[Replica]) -> Replica | None:
    """Which replica process has a TCP socket bound locally to `port` (its end of a PG connection)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    for r in replicas:
        if r.proc is not None and r.proc.poll() is None and inodes & _socket_inodes(r.proc.pid):
            return r
    return None


@dataclass
class ReplicaSet:
    init: InitResult
    storage: str
    a: Replica
    b: Replica
    ca: Path
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    _access_key: tuple[str, str] | None = None

    @property
    def all(self) -> list[Replica]:
        return [self.a, self.b]

    def session(self, cert: Path | None = None, key: Path | None = None) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(self.ca, cert, key)))
        self._sessions.append(s)
        return s

    async def mgmt(self, r: Replica, method: str, path: str, json: Any = None) -> tuple[int, dict]:
        s = self._sessions[0] if self._sessions else self.session()
        async with s.request(method, f"{r.mgmt_url}/api/v1{path}", json=json,
                             headers={"Authorization": f"Bearer {self.init.token}"},
                             timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def access_key(self, r: Replica) -> tuple[str, str]:
        """A v1.2 user access key (id, secret) of the bootstrap operator, made once."""
        if self._access_key is None:
            st, out = await self.mgmt(r, "POST", "/access-keys", {"description": "replica tests"})
            assert st == 201, out
            self._access_key = (out["body"]["accessKeyId"], out["body"]["secretAccessKey"])
        return self._access_key

    async def client(self, r: Replica, method: str, path: str, json: Any = None) -> tuple[int, dict]:
        """Client API v1.2 (writes such as PUT /secrets need it) with the access key."""
        key_id, secret = await self.access_key(r)
        s = self._sessions[0] if self._sessions else self.session()
        async with s.request(method, f"{r.data_url}/keymanager/v1.2/appkey/{self.init.appkey}{path}", json=json,
                             headers={"X-TC-AUTHENTICATION-ID": key_id, "X-TC-AUTHENTICATION-SECRET": secret},
                             timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def keystore(self, r: Replica, name: str) -> int:
        st, out = await self.mgmt(r, "POST", "/keystores", {"name": name, "ip4AuthUse": "Y"})
        assert st == 201, out
        ks = out["body"]["keyStoreId"]
        st, out = await self.mgmt(r, "POST", f"/keystores/{ks}/auths/ipv4s", {"value": "127.0.0.1"})
        assert st == 201, out
        return ks

    async def key(self, r: Replica, keystore: int, key_type: str, name: str, **fields: Any) -> str:
        st, out = await self.mgmt(r, "POST", f"/keystores/{keystore}/keys",
                                  {"keyType": key_type, "name": name, **fields})
        assert st == 201, out
        return out["body"]["keyId"]

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.storage, timeout=10)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def job_holder(self) -> Replica | None:
        """The replica whose database session holds the background-job advisory lock, if any."""
        key = lock_key(JOBS_LOCK) & 0xFFFFFFFFFFFFFFFF
        rows = await self.sql(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid", key >> 32, key & 0xFFFFFFFF)
        assert len(rows) <= 1, f"{len(rows)} sessions hold the job lock at once"
        if not rows:
            return None
        return owner_of_local_port(rows[0]["client_port"], self.all)

    async def wait_job_holder(self, among: list[Replica], timeout: float = 15.0) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holder = await self.job_holder()
            if holder in among:
                return holder
            await asyncio.sleep(0.1)
        raise AssertionError(f"no replica among {[r.name for r in among]} took the job lock in {timeout}s")

    async def close(self) -> None:
        for s in self._sessions:
            await s.close()
        for r in self.all:
            r.stop()


@pytest.fixture
async def replicas(pg_url: str, tmp_path: Path) -> AsyncIterator[ReplicaSet]:
    data = tmp_path / "data"
    cfg = load(ServerConfig, None, env={}, overrides={"data_dir": str(data), "storage": pg_url})
    init = await init_server(cfg)
    made = [Replica(name, tmp_path, data, pg_url, purge_interval=0.3) for name in ("a", "b")]
    rs = ReplicaSet(init, pg_url, made[0], made[1], init.ca_cert)
    try:
        yield rs
    finally:
        await rs.close()
