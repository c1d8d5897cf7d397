"""A real key server on loopback (both TLS listeners, port 0), initialised in a temp dir.

Use the `skm` fixture: it yields a `Harness` with the server, the appkey, an
operator token, and helpers for client-API and management-API calls over TLS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.access.pki import DevPKI, cert_pem, key_pem, write_pem
from server.access.tls import client_context
from server.app import KeyServer
from server.config import load
from server.init import InitResult, init_server
from server.settings import ServerConfig

__all__ = ["Harness", "make_config", "skm", "start_harness", "start_restored_harness", "harness_backend",
           "harness_restored"]


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    base = {"data_dir": str(data_dir), "purge_interval": 3600.0, "min_auto_rotation_days": 30,
            "data": {"port": 0}, "mgmt": {"port": 0}, "log_format": "json"}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load(ServerConfig, None, env={}, overrides=base)


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    """The text of a /metrics endpoint."""
    async with session.get(url) as r:
        assert r.status == 200
        return await r.text()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` (with these label values) in a /metrics text; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclass
class Harness:
    server: KeyServer
    init: InitResult
    tmp: Path
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def rt(self):
        return self.server.runtime

    @property
    def appkey(self) -> str:
        return self.init.appkey

    @property
    def data_url(self) -> str:
        return f"https://127.0.0.1:{self.server.data_port}"

    @property
    def mgmt_url(self) -> str:
        return f"https://127.0.0.1:{self.server.mgmt_port}"

    @property
    def pki(self) -> DevPKI:
        return DevPKI(self.server.config.pki_dir())

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        return client_context(self.pki.ca_cert, cert, key)

    def client_cert(self, name: str = "client", **issue: Any) -> tuple[Path, Path]:
        """A client certificate from the server's CA (not yet registered to any key store)."""
        ca = self.pki.load_ca()
        cert, key = ca.issue(name, client=True, **issue)
        cp, kp = self.tmp / f"{name}.pem", self.tmp / f"{name}-key.pem"
        write_pem(cp, cert_pem(cert), private=False)
        write_pem(kp, key_pem(key), private=True)
        return cp, kp

    def session(self, cert: Path | None = None, key: Path | None = None, headers: dict | None = None
                ) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl(cert, key)), headers=headers)
        self.sessions.append(s)
        return s

    def client_path(self, path: str, version: str = "v1.0", appkey: str | None = None) -> str:
        return f"{self.data_url}/keymanager/{version}/appkey/{appkey or self.appkey}{path}"

    async def client(self, method: str, path: str, *, version: str = "v1.0", json: Any = None,
                     session: aiohttp.ClientSession | None = None, **kw: Any) -> tuple[int, dict]:
        s = session or self._default()
        async with s.request(method, self.client_path(path, version), json=json, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def mgmt(self, method: str, path: str, *, json: Any = None, token: str | None = None,
                   **kw: Any) -> tuple[int, dict]:
        s = self._default()
        headers = {"Authorization": f"Bearer {token or self.init.token}", **kw.pop("headers", {})}
        async with s.request(method, f"{self.mgmt_url}/api/v1{path}", json=json, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    def _default(self) -> aiohttp.ClientSession:
        if not self.sessions:
            self.session()
        return self.sessions[0]

    async def metric(self, name: str, **labels: str) -> float:
        """A metric of the management plane's /metrics, read as a scraper reads it (see `metric_sum`)."""
        return metric_sum(await scrape(self._default(), f"{self.mgmt_url}/metrics"), name, **labels)

    # -- conveniences for tests --------------------------------------------
    async def keystore(self, name: str = "store", **fields: Any) -> dict:
        register = fields.pop("register_loopback", True)
        body = {"name": name, "ip4AuthUse": "Y", **fields}
        st, out = await self.mgmt("POST", "/keystores", json=body)
        assert st == 201, out
        if body.get("ip4AuthUse") == "Y" and register:
            st, added = await self.mgmt("POST", f"/keystores/{out['body']['keyStoreId']}/auths/ipv4s",
                                        json={"value": "127.0.0.1"})
            assert st == 201, added
        return out["body"]

    async def key(self, store: dict, key_type: str, name: str, **fields: Any) -> dict:
        st, out = await self.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                                  json={"keyType": key_type, "name": name, **fields})
        assert st == 201, out
        return out["body"]

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()
        self.sessions.clear()
        await self.server.stop()


async def start_harness(tmp: Path, *, storage: str | None = None, **overrides: Any) -> Harness:
    """`storage`: a storage URL (e.g. a PostgreSQL database); default SQLite in the data dir."""
    if storage:
        overrides["storage"] = storage
    cfg = make_config(tmp / "data", **overrides)
    result = await init_server(cfg)
    server = await KeyServer(cfg).start()
    return Harness(server, result, tmp)


async def start_restored_harness(tmp: Path, storage: str, **overrides: Any) -> Harness:
    """A server whose store arrived by backup and restore: initialised on SQLite, backed up, restored
    into `storage` (a fresh PostgreSQL database), and served from there (same root and system key)."""
    from server.backup.keys import unsealed_barrier
    from server.backup.restore import restore
    from server.backup.schedule import backup_to_file
    from server.storage.factory import open_storage
    src_cfg = make_config(tmp / "data", **overrides)
    result = await init_server(src_cfg)
    backup = tmp / "harness.skmbak"
    async with unsealed_barrier(src_cfg) as barrier:
        src = open_storage(src_cfg.storage_url())
        await src.open()
        try:
            await backup_to_file(src, barrier, backup)
        finally:
            await src.close()
        await restore(backup, barrier, storage)
    for leftover in (tmp / "data").glob("skm.db*"):
        leftover.unlink()            # the server can only be reading the restored store
    cfg = make_config(tmp / "data", storage=storage, **overrides)
    server = await KeyServer(cfg).start()
    return Harness(server, result, tmp)


def harness_restored() -> bool:
    """SKM_TEST_RESTORED=1 (with SKM_TEST_STORAGE=postgresql): every `skm` server starts on a store moved from
    SQLite to PostgreSQL through `skm backup` (server/backup/), so a suite proves the moved store serves."""
    return os.environ.get("SKM_TEST_RESTORED", "") == "1"


def harness_backend() -> str:
    """SKM_TEST_STORAGE=postgresql runs every `skm` test on a throwaway PostgreSQL database."""
    backend = os.environ.get("SKM_TEST_STORAGE", "sqlite") or "sqlite"
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"SKM_TEST_STORAGE must be sqlite or postgresql, not {backend!r}")
    return backend



@pytest.fixture
async def skm(request, tmp_path):
    with contextlib.ExitStack() as stack:
        storage = None
        if harness_backend() == "postgresql":
            from tests.support.postgres import session_cluster
            storage = stack.enter_context(session_cluster(request.config).database())
        if harness_restored():
            if storage is None:
                raise ValueError("SKM_TEST_RESTORED=1 needs SKM_TEST_STORAGE=postgresql (the restore's target)")
            h = await start_restored_harness(tmp_path, storage)
        else:
            h = await start_harness(tmp_path, storage=storage)
        try:
            yield h
        finally:
            try:
                await _harvest_for_sweep(request, h)
            finally:
                await h.close()


async def _harvest_for_sweep(request, h: Harness) -> None:
    """Before the server stops (and its PostgreSQL database is dropped): its token, key material, row dump,
    data dir and the cluster's log join the secret-hygiene sweep, when this session harvests harnesses
    (tests/support/hygiene_plugin.py). The test's captured output (the server's logs) joins by the plugin's
    report hook."""
    from tests.support.hygiene_plugin import HYGIENE, harvest_harnesses
    if not harvest_harnesses():
        return
    HYGIENE.secret(h.init.token, "harness operator token")
    await HYGIENE.harvest_quietly(h.server.config, f"harness {request.node.nodeid}")
    from tests.support.postgres import session_cluster_log
    log = session_cluster_log(request.config)
    if log is not None:
        HYGIENE.path(log)
