"""The system-key server over real mTLS, its state files, and the key server's client of it."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from server.access.tls import client_context
from server.barrier.barrier import Barrier
from server.barrier.keyring import WrappedKeyring, new_keyring, save_keyring_file
from server.barrier.remote import (RemoteKeyringSource, SystemKeyUnavailable, refresh_keyring,
                                   unseal_with_retry)
from server.barrier.rootkey import FileRootKey, WrongRootKey
from server.config import load
from server.errors import ConfigError, InvalidRequest
from server.settings import SystemKeySourceConfig
from server.systemkey import admin
from server.systemkey.app import serve, server_ssl_context
from server.systemkey.settings import SystemKeyServerConfig
from server.systemkey.state import SystemKeyState
from tests.support.pki import TestPKI, pki  # noqa: F401  (fixture)


def sk_config(data_dir: Path, pki: TestPKI, port: int = 0) -> SystemKeyServerConfig:
    return load(SystemKeyServerConfig, None, env={}, overrides={
        "data_dir": str(data_dir), "port": port, "cert": str(pki.systemkey_cert), "key": str(pki.systemkey_key),
        "client_ca": str(pki.ca_pem), "log_format": "json"})


def source_config(pki: TestPKI, *urls: str, cert: Path | None = None, key: Path | None = None,
                  timeout: float = 3.0) -> SystemKeySourceConfig:
    return SystemKeySourceConfig(source="remote", urls=tuple(urls), client_cert=str(cert or pki.keyserver_cert),
                                 client_key=str(key or pki.keyserver_key), ca=str(pki.ca_pem), timeout=timeout)


@dataclass
class Env:
    cfg: SystemKeyServerConfig
    root: FileRootKey
    ring: WrappedKeyring
    url: str
    pki: TestPKI
    tmp: Path

    def source(self, **kw: Any) -> RemoteKeyringSource:
        return RemoteKeyringSource(source_config(self.pki, self.url, **kw))

    def state(self) -> SystemKeyState:
        return SystemKeyState(self.cfg)


@pytest.fixture
async def env(tmp_path: Path, pki: TestPKI) -> AsyncIterator[Env]:
    root = FileRootKey.create(tmp_path / "keyserver" / "root.key")  # on the key-server host only
    ring = await new_keyring(root)
    cfg = sk_config(tmp_path / "systemkey", pki)
    admin.init(cfg, ring)
    assert admin.allow(cfg, pki.keyserver_fp, "key server 1")
    runner, port = await serve(cfg)
    try:
        yield Env(cfg, root, ring, f"https://127.0.0.1:{port}", pki, tmp_path)
    finally:
        await runner.cleanup()


async def raw_get(url: str, ctx: ssl.SSLContext, method: str = "GET") -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.request(method, url, ssl=ctx) as r:
            return r.status, await r.json(content_type=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def _rec(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None: self._rec("info", event, **kw)
    def warning(self, event: str, **kw: Any) -> None: self._rec("warning", event, **kw)
    def error(self, event: str, **kw: Any) -> None: self._rec("error", event, **kw)


# --- fetching -------------------------------------------------------------------
async def test_allowed_key_server_fetches_the_keyring_and_the_fetch_is_audited(env: Env):
    ring = await env.source().fetch()
    assert ring.to_json() == env.ring.to_json()
    rec = env.state().audit_records()[-1]
    assert rec["result"] == "allowed" and rec["peer_fingerprint"] == env.pki.keyserver_fp
    assert rec["subject"] == "keyserver" and rec["current"] == 1 and rec["time"].endswith("+00:00")
    # and it unseals a barrier with the key server's root key
    barrier = Barrier()
    barrier.unseal(await ring.unwrap_all(env.root), ring.current)
    assert not barrier.sealed


async def test_certificate_not_on_the_allow_list_gets_403(env: Env):
    ctx = client_context(env.pki.ca_pem, env.pki.other_cert, env.pki.other_key)
    status, body = await raw_get(env.url + "/v1/keyring", ctx)
    assert status == 403
    assert body["header"]["isSuccessful"] is False and body["header"]["resultMessage"] == "Forbidden"
    assert env.pki.other_fp in body["header"]["resultDetail"]
    assert body["body"] is None and "versions" not in json.dumps(body)
    with pytest.raises(SystemKeyUnavailable) as ei:
        await env.source(cert=env.pki.other_cert, key=env.pki.other_key).fetch()
    assert ei.value.status_codes == [403] and "allow-list" in str(ei.value)
    denied = [r for r in env.state().audit_records() if r["result"] == "denied"]
    assert len(denied) == 2 and {r["peer_fingerprint"] for r in denied} == {env.pki.other_fp}


@pytest.mark.parametrize("who", ["foreign-ca", "no-cert"])
async def test_foreign_ca_or_no_certificate_fails_the_handshake(env: Env, who: str):
    if who == "foreign-ca":
        ctx = client_context(env.pki.ca_pem, env.pki.foreign_cert, env.pki.foreign_key)
    else:
        ctx = client_context(env.pki.ca_pem)
    before = len(env.state().audit_records())
    with pytest.raises(aiohttp.ClientConnectionError):
        await raw_get(env.url + "/v1/keyring", ctx)
    with pytest.raises(aiohttp.ClientConnectionError):
        await raw_get(env.url + "/healthz", ctx)
    src = RemoteKeyringSource(source_config(env.pki, env.url), ssl_context=ctx)
    with pytest.raises(SystemKeyUnavailable) as ei:
        await src.fetch()
    assert ei.value.status_codes == []
    assert len(env.state().audit_records()) == before  # no HTTP request ever reached the app


async def test_key_server_rejects_a_system_key_server_it_does_not_trust(env: Env):
    cfg = dataclasses.replace(source_config(env.pki, env.url), ca=str(env.pki.foreign_ca_pem))
    with pytest.raises(SystemKeyUnavailable, match="not trusted"):
        await RemoteKeyringSource(cfg).fetch()


async def test_tls_settings(env: Env):
    ctx = server_ssl_context(*env.cfg.tls_files())
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert all(("GCM" in c["name"] or "CHACHA20" in c["name"]) for c in ctx.get_ciphers())
    # a TLS 1.2 client offering only a CBC suite is refused
    cbc = client_context(env.pki.ca_pem, env.pki.keyserver_cert, env.pki.keyserver_key)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(aiohttp.ClientConnectionError):
        await raw_get(env.url + "/healthz", cbc)


async def test_rotation_is_not_exposed_and_healthz_answers(env: Env):
    ctx = client_context(env.pki.ca_pem, env.pki.keyserver_cert, env.pki.keyserver_key)
    for method in ("POST", "GET", "PUT"):
        status, body = await raw_get(env.url + "/v1/keyring/rotate", ctx, method)
        assert status == 404 and body["header"]["isSuccessful"] is False
    status, _ = await raw_get(env.url + "/v1/keyring", ctx, "POST")
    assert status == 405
    assert env.state().load_keyring().to_json() == env.ring.to_json()
    assert await raw_get(env.url + "/healthz", ctx) == (200, {"status": "ok"})


async def test_allow_and_revoke_take_effect_on_the_next_fetch(env: Env):
    other = env.source(cert=env.pki.other_cert, key=env.pki.other_key)
    with pytest.raises(SystemKeyUnavailable):
        await other.fetch()
    assert admin.allow(env.cfg, str(env.pki.other_cert))  # by certificate file
    assert not admin.allow(env.cfg, env.pki.other_fp.upper())  # already there, any spelling
    assert (await other.fetch()).current == 1
    colons = ":".join(env.pki.other_fp[i:i + 2] for i in range(0, 64, 2)).upper()  # openssl's spelling
    assert admin.revoke(env.cfg, colons)
    assert not admin.revoke(env.cfg, env.pki.other_fp)
    with pytest.raises(SystemKeyUnavailable):
        await other.fetch()
    assert [fp for fp, _ in admin.allowed(env.cfg)] == [env.pki.keyserver_fp]
    with pytest.raises(InvalidRequest):
        admin.allow(env.cfg, "not-a-fingerprint")
    assert os.stat(env.cfg.allow_list_path()).st_mode & 0o777 == 0o600


async def test_several_urls_fail_over_and_report_every_failure(env: Env):
    dead = f"https://127.0.0.1:{free_port()}"
    src = RemoteKeyringSource(source_config(env.pki, dead, env.url))
    assert (await src.fetch()).current == 1
    src = RemoteKeyringSource(source_config(env.pki, dead, f"https://127.0.0.1:{free_port()}", timeout=1))
    with pytest.raises(SystemKeyUnavailable) as ei:
        await src.fetch()
    assert len(ei.value.failures) == 2 and all("unreachable" in r for _, _, r in ei.value.failures)


# --- state and admin commands ----------------------------------------------------
async def test_state_files_hold_no_unwrapped_key_material(env: Env):
    await admin.rotate(env.cfg, env.root)  # two versions on disk
    await env.source().fetch()
    ring = env.state().load_keyring()
    plain = await ring.unwrap_all(env.root)
    assert sorted(plain) == [1, 2]
    needles: list[bytes] = [(env.tmp / "keyserver" / "root.key").read_bytes()]
    for k in plain.values():
        needles += [k, base64.b64encode(k), base64.urlsafe_b64encode(k), base64.b64encode(k).rstrip(b"="),
                    k.hex().encode(), k.hex().upper().encode()]
    files = [p for p in env.cfg.data_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"keyring.json", "allowed.txt", "audit.jsonl"}
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, f"{p.name} holds key material"
        assert os.stat(p).st_mode & 0o077 == 0, f"{p.name} is readable by group or others"
    assert os.stat(env.cfg.data_path).st_mode & 0o077 == 0


async def test_rotate_adds_a_version_the_key_server_picks_up(env: Env):
    barrier = Barrier()
    ring = await unseal_with_retry(barrier, env.source(), env.root, initial=0.05, maximum=0.1, log=RecordingLog())
    assert ring.current == 1
    blob_v1 = barrier.seal(b"old record", b"aad")
    assert await admin.rotate(env.cfg, env.root) == 2
    assert await refresh_keyring(barrier, env.source(), env.root) == [2]
    assert barrier.current_version == 2 and barrier.versions() == [1, 2]
    assert Barrier.version_of(barrier.seal(b"new", b"aad")) == 2
    assert barrier.open(blob_v1, b"aad") == b"old record"
    assert await refresh_keyring(barrier, env.source(), env.root) == []


async def test_rotate_with_the_wrong_root_key_changes_nothing(env: Env):
    wrong = FileRootKey.create(env.tmp / "wrong.key")
    before = env.cfg.keyring_path().read_bytes()
    with pytest.raises(WrongRootKey):
        await admin.rotate(env.cfg, wrong)
    assert env.cfg.keyring_path().read_bytes() == before


async def test_root_key_rotation_rewraps_the_same_system_keys(env: Env):
    new_root = FileRootKey.create(env.tmp / "new-root.key")
    before = await env.state().load_keyring().unwrap_all(env.root)
    await admin.rotate_root(env.cfg, env.root, new_root)
    ring = await env.source().fetch()
    assert await ring.unwrap_all(new_root) == before
    with pytest.raises(WrongRootKey):
        await ring.unwrap_all(env.root)


async def test_retire_init_and_status(env: Env, tmp_path: Path):
    with pytest.raises(ConfigError, match="current"):
        admin.retire(env.cfg, 1)
    await admin.rotate(env.cfg, env.root)
    admin.retire(env.cfg, 1)
    ring = await env.source().fetch()
    assert ring.retired == (1,) and sorted(await ring.unwrap_all(env.root)) == [2]
    st = admin.status(env.cfg)
    assert st["current"] == 2 and st["versions"] == [1, 2] and st["retired"] == [1] and st["allowed"] == 1
    with pytest.raises(ConfigError, match="already exists"):
        admin.init(env.cfg, env.ring)
    # `skm systemkey init --keyring FILE` on a fresh dir
    f = tmp_path / "exported.json"
    save_keyring_file(f, env.ring)
    cfg2 = sk_config(tmp_path / "sk2", env.pki)
    admin.init_from_file(cfg2, f)
    assert SystemKeyState(cfg2).load_keyring().to_json() == env.ring.to_json()
    with pytest.raises(ConfigError, match="init"):
        await serve(sk_config(tmp_path / "empty", env.pki))


def test_config_loads_from_toml_and_environment(tmp_path: Path):
    toml = tmp_path / "systemkey.toml"
    toml.write_text('data_dir = "/var/lib/skm-systemkey"\nport = 9000\n')
    cfg = load(SystemKeyServerConfig, toml, env_prefix="SKM_SYSTEMKEY_", env={"SKM_SYSTEMKEY_PORT": "9100"})
    assert cfg.data_dir == "/var/lib/skm-systemkey" and cfg.port == 9100
    assert cfg.keyring_path() == Path("/var/lib/skm-systemkey/keyring.json")
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load(SystemKeyServerConfig, toml, env_prefix="SKM_SYSTEMKEY_", env={})


# --- sealed start ---------------------------------------------------------------
async def test_barrier_unseals_by_itself_once_the_system_key_server_starts(tmp_path: Path, pki: TestPKI):
    root = FileRootKey.create(tmp_path / "root.key")
    ring = await new_keyring(root)
    port = free_port()
    cfg = sk_config(tmp_path / "systemkey", pki, port=port)
    admin.init(cfg, ring)
    admin.allow(cfg, pki.keyserver_fp)
    barrier = Barrier()
    log = RecordingLog()
    source = RemoteKeyringSource(source_config(pki, f"https://127.0.0.1:{port}", timeout=1))
    task = asyncio.create_task(unseal_with_retry(barrier, source, root, initial=0.1, maximum=0.4, log=log))
    runner = None
    try:
        await asyncio.sleep(1.5)
        assert barrier.sealed and not task.done()
        assert "unreachable" in barrier.sealed_reason
        runner, _ = await serve(cfg)
        await asyncio.wait_for(task, timeout=10)
        assert not barrier.sealed and barrier.current_version == 1
    finally:
        task.cancel()
        if runner is not None:
            await runner.cleanup()
    failed = [e for e in log.events if e[1] == "system_key_fetch_failed"]
    assert len(failed) >= 3 and all(e[0] == "warning" and "attempt" in e[2] for e in failed)
    assert [e[2]["attempt"] for e in failed] == list(range(1, len(failed) + 1))
    assert log.events[-1][1] == "system_key_fetched"
    # no key material in any log field
    key = (await ring.unwrap_all(root))[1]
    text = repr(log.events)
    for n in (key.hex(), base64.b64encode(key).decode(), repr(key), base64.b64encode(ring.versions[1]).decode()):
        assert n not in text


async def test_wrong_root_key_stops_retrying(env: Env):
    wrong = FileRootKey.create(env.tmp / "wrong.key")
    log = RecordingLog()
    barrier = Barrier()
    with pytest.raises(WrongRootKey):
        await asyncio.wait_for(unseal_with_retry(barrier, env.source(), wrong, initial=0.05, maximum=0.1, log=log),
                               timeout=5)
    assert barrier.sealed
    assert [e[1] for e in log.events] == ["system_key_unseal_refused"]


async def test_remote_source_config_errors_are_clear(pki: TestPKI):
    with pytest.raises(ConfigError, match="systemkey.urls"):
        RemoteKeyringSource(SystemKeySourceConfig(source="remote"))
    with pytest.raises(ConfigError, match="https://"):
        RemoteKeyringSource(SystemKeySourceConfig(source="remote", urls=("http://x:1",)))
    src = RemoteKeyringSource(SystemKeySourceConfig(source="remote", urls=("https://127.0.0.1:1",)))
    with pytest.raises(ConfigError, match="client_cert"):
        await src.fetch()
    # a config error is not an outage: no retry loop
    with pytest.raises(ConfigError):
        await asyncio.wait_for(unseal_with_retry(Barrier(), src, FileRootKey.create(pki.dir / "r.key"),
                                                 initial=0.05, maximum=0.1, log=RecordingLog()), timeout=5)


async def test_a_connection_that_never_starts_tls_is_closed_at_the_handshake_deadline(tmp_path: Path, pki: TestPKI):
    from tests.api.test_hardening import eof_within
    root = FileRootKey.create(tmp_path / "keyserver" / "root.key")
    cfg = load(SystemKeyServerConfig, None, env={"SKM_SYSTEMKEY_HANDSHAKE_TIMEOUT": "0.5"}, env_prefix="SKM_SYSTEMKEY_",
               overrides={"data_dir": str(tmp_path / "systemkey"), "port": 0, "cert": str(pki.systemkey_cert),
                          "key": str(pki.systemkey_key), "client_ca": str(pki.ca_pem), "log_format": "json"})
    assert cfg.handshake_timeout == 0.5
    admin.init(cfg, await new_keyring(root))
    runner, port = await serve(cfg)
    try:
        assert await eof_within("127.0.0.1", port, 10)       # asyncio's default would wait 60 s
    finally:
        await runner.cleanup()
