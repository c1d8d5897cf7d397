"""Sealed start: a key server whose system key lives on a system-key server.

The key server comes up sealed, answers 503 "Sealed" with the reason on both
planes, and unseals by itself once the system-key server is up and allows it.
Also as real processes (`skm server run`, `skm systemkey run`) and with the root
key in SoftHSM2.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from server.access.pki import CA, cert_pem, key_pem, write_pem
from server.access.tls import client_context
from server.app import KeyServer
from server.cli.cmd_server import export_keyring
from server.cli.cmd_systemkey import issue_certificate
from server.config import load
from server.init import InitResult, init_server
from server.settings import ServerConfig
from server.systemkey import admin
from server.systemkey.app import serve
from server.systemkey.settings import SystemKeyServerConfig
from server.systemkey.state import SystemKeyState
from tests.support.server import Harness, make_config
from tests.support.softhsm import SoftHSM, softhsm  # noqa: F401  (fixture)

SKM = [sys.executable, "-m", "server.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a key server and a system-key server with separate state ---------------------
@dataclass
class Stack:
    """Key-server dir (database, root key, PKI; no keyring) and system-key dir (wrapped keyring)."""
    tmp: Path
    ks_cfg: ServerConfig
    sk_cfg: SystemKeyServerConfig
    init: InitResult
    sk_runner: web.AppRunner | None = None
    harness: Harness | None = None
    _extra: list[Any] = field(default_factory=list)

    @property
    def sk_url(self) -> str:
        return f"https://127.0.0.1:{self.sk_cfg.port}"

    async def start_systemkey(self) -> None:
        self.sk_runner, _ = await serve(self.sk_cfg)

    async def stop_systemkey(self) -> None:
        if self.sk_runner is not None:
            await self.sk_runner.cleanup()
            self.sk_runner = None

    async def start_keyserver(self, cfg: ServerConfig | None = None) -> Harness:
        server = await KeyServer(cfg or self.ks_cfg).start()
        self.harness = Harness(server, self.init, self.tmp)
        return self.harness

    async def stop_keyserver(self) -> None:
        if self.harness is not None:
            await self.harness.close()
            self.harness = None

    async def close(self) -> None:
        await self.stop_keyserver()
        await self.stop_systemkey()


def remote_overrides(sk_port: int, **kw: Any) -> dict:
    return {"source": "remote", "urls": [f"https://127.0.0.1:{sk_port}"], "retry_initial": 0.05,
            "retry_max": 0.3, "timeout": 2.0, **kw}


async def make_stack(tmp: Path, *, allow: bool = True, **ks_overrides: Any) -> Stack:
    """Initialise a key server, move its wrapped keyring to a system-key server dir (not started)."""
    sk_port = free_port()
    ks_cfg = make_config(tmp / "keyserver", systemkey=remote_overrides(sk_port), **ks_overrides)
    init = await init_server(ks_cfg)
    exported = tmp / "exported-keyring.json"
    export_keyring(ks_cfg, exported)
    sk_cfg = load(SystemKeyServerConfig, None, env={}, overrides={
        "data_dir": str(tmp / "systemkey"), "port": sk_port, "log_format": "json"})
    admin.init_from_file(sk_cfg, exported)
    exported.unlink()
    issue_certificate(sk_cfg, ks_cfg.pki_dir())
    if allow:
        assert admin.allow(sk_cfg, str(ks_cfg.pki_dir() / "server.pem"), "key server")
    return Stack(tmp, ks_cfg, sk_cfg, init)


@contextlib.asynccontextmanager
async def stack_of(tmp: Path, **kw: Any) -> AsyncIterator[Stack]:
    st = await make_stack(tmp, **kw)
    try:
        yield st
    finally:
        await st.close()


# Deadlines are for a loaded machine (2 cores, many runs): generous, never a speed claim.
DEADLINE = 30.0


async def wait_unsealed(h: Harness, timeout: float = DEADLINE) -> float:
    t0 = time.monotonic()
    while h.rt.barrier.sealed:
        assert time.monotonic() - t0 < timeout, f"still sealed: {h.rt.barrier.sealed_reason}"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def wait_sealed_reason(h: Harness, part: str, timeout: float = DEADLINE) -> None:
    """Until the barrier says why it is sealed (the first unseal attempt has run and failed)."""
    t0 = time.monotonic()
    while part not in (h.rt.barrier.sealed_reason or ""):
        assert h.rt.barrier.sealed, "unsealed while waiting for a sealed reason"
        assert time.monotonic() - t0 < timeout, f"sealed reason is {h.rt.barrier.sealed_reason!r}, not {part!r}"
        await asyncio.sleep(0.05)


async def get_json(h: Harness, url: str, **kw: Any) -> tuple[int, dict]:
    async with h._default().get(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def assert_sealed_everywhere(h: Harness, reason_part: str) -> None:
    for base in (h.data_url, h.mgmt_url):
        st, body = await get_json(h, base + "/healthz")
        assert st == 503 and body["status"] == "sealed" and body["sealed"] is True
        assert reason_part in body["reason"]
    key_id = "0" * 32
    for st, body in (await h.client("GET", f"/secrets/{key_id}"),
                     await h.client("POST", f"/symmetric-keys/{key_id}/encrypt", json={"plaintext": "x"}),
                     await h.mgmt("GET", "/keystores"),
                     await h.mgmt("POST", "/keystores", json={"name": "x", "ip4AuthUse": "Y"}),
                     await h.mgmt("GET", "/system/status")):
        assert st == 503, body
        assert body["header"]["isSuccessful"] is False and body["header"]["resultMessage"] == "Sealed"
        assert reason_part in body["header"]["resultDetail"] and body["body"] is None
    async with h._default().get(h.mgmt_url + "/metrics") as r:
        assert "skm_sealed 1.0" in await r.text()


async def secret_round_trip(h: Harness, value: str) -> str:
    store = await h.keystore("s-" + os.urandom(4).hex())
    key = await h.key(store, "SECRET", "pw", secretValue=value)
    st, body = await h.client("GET", f"/secrets/{key['keyId']}")
    assert st == 200 and body["body"]["secret"] == value
    return key["keyId"]


# --- in-process -------------------------------------------------------------------------
async def test_sealed_until_the_system_key_server_starts_then_unseals_by_itself(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        assert not st.ks_cfg.system_key_path().exists()  # the keyring is only on the system-key server
        h = await st.start_keyserver()
        await wait_sealed_reason(h, "unreachable")
        await assert_sealed_everywhere(h, "unreachable")
        await st.start_systemkey()
        await wait_unsealed(h)
        st_, body = await get_json(h, h.data_url + "/healthz")
        assert (st_, body) == (200, {"status": "ok", "sealed": False})
        await secret_round_trip(h, "after-unseal")
        fetches = [r for r in SystemKeyState(st.sk_cfg).audit_records() if r["result"] == "allowed"]
        assert len(fetches) == 1 and fetches[0]["subject"] == "server"


@pytest.mark.parametrize("who", ["not-allow-listed", "foreign-ca-cert"])
async def test_a_key_server_the_system_key_server_does_not_allow_stays_sealed(tmp_path: Path, who: str):
    async with stack_of(tmp_path, allow=False) as st:
        await st.start_systemkey()
        cfg = st.ks_cfg
        if who == "foreign-ca-cert":
            foreign = CA.create("Foreign CA")
            cert, key = foreign.issue("server", client=True)
            write_pem(tmp_path / "foreign.pem", cert_pem(cert), private=False)
            write_pem(tmp_path / "foreign-key.pem", key_pem(key), private=True)
            import dataclasses
            cfg = dataclasses.replace(cfg, systemkey=dataclasses.replace(
                cfg.systemkey, client_cert=str(tmp_path / "foreign.pem"), client_key=str(tmp_path / "foreign-key.pem")))
            # even an allow-listed fingerprint does not help a certificate the system-key server's CA did not sign
            admin.allow(st.sk_cfg, str(tmp_path / "foreign.pem"))
        h = await st.start_keyserver(cfg)
        reason = "allow-list" if who == "not-allow-listed" else "connection failed"
        await wait_sealed_reason(h, reason)
        await assert_sealed_everywhere(h, reason)
        records = SystemKeyState(st.sk_cfg).audit_records()
        if who == "not-allow-listed":
            assert records and all(r["result"] == "denied" for r in records)
            # allow-listing it on the system-key host is enough: the key server retries by itself
            admin.allow(st.sk_cfg, str(cfg.pki_dir() / "server.pem"))
            await wait_unsealed(h)
            await secret_round_trip(h, "allowed-now")
        else:
            assert records == []  # refused at the TLS handshake: no request reached the app
            assert h.rt.barrier.sealed


# --- real processes -------------------------------------------------------------------
async def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*SKM, *args, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE, env={**cli_env(), **(env or {})})
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode, out.decode(), err.decode()


def cli_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SKM_")},
            "SKM_CONFIG": "/nonexistent", "COLUMNS": "200", "SKM_LOG_LEVEL": "warning",
            **{k: v for k, v in os.environ.items() if k.startswith("SKM_TEST_")}}


@contextlib.asynccontextmanager
async def process(*args: str, env: dict | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    log = open(os.devnull, "wb")
    p = await asyncio.create_subprocess_exec(*SKM, *args, stdout=log, stderr=asyncio.subprocess.PIPE,
                                             env={**cli_env(), **(env or {})})
    try:
        yield p
    finally:
        if p.returncode is None:
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), 10)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()
        log.close()


async def health(url: str, ca: Path) -> tuple[int, dict] | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(url + "/healthz", ssl=client_context(ca)) as r:
                return r.status, await r.json(content_type=None)
    except aiohttp.ClientConnectionError:
        return None


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_real_processes_sealed_start_and_the_cli_flow(tmp_path: Path):
    """`skm server init` → `export-keyring` → `skm systemkey init --pki --allow` → both `run` as processes."""
    ks_dir, sk_dir = tmp_path / "keyserver", tmp_path / "systemkey"
    data_port, mgmt_port, sk_port = free_port(), free_port(), free_port()
    ks_toml = write_toml(tmp_path / "keyserver.toml", f'''data_dir = "{ks_dir}"
log_format = "json"
[data]
port = {data_port}
[mgmt]
port = {mgmt_port}
[systemkey]
source = "remote"
urls = ["https://127.0.0.1:{sk_port}"]
retry_initial = 0.1
retry_max = 0.5
timeout = 2.0
''')
    sk_toml = write_toml(tmp_path / "systemkey.toml", f'data_dir = "{sk_dir}"\nport = {sk_port}\nlog_format = "json"\n')
    code, out, err = await run_cli("server", "init", "-c", str(ks_toml))
    assert code == 0, err
    token = next(line.split()[-1] for line in out.splitlines() if "operator token" in line)
    exported = tmp_path / "keyring-export.json"
    code, out, err = await run_cli("server", "export-keyring", "-c", str(ks_toml), "--out", str(exported))
    assert code == 0, err
    assert "skm systemkey allow" in out and not (ks_dir / "systemkey.json").exists()
    assert os.stat(exported).st_mode & 0o777 == 0o600
    code, out, err = await run_cli("systemkey", "init", "-c", str(sk_toml), "--keyring", str(exported),
                                   "--pki", str(ks_dir / "pki"), "--allow", str(ks_dir / "pki" / "server.pem"))
    assert code == 0, err
    assert "allow-listed key servers: 1" in out
    exported.unlink()
    ca = ks_dir / "pki" / "ca.pem"
    mgmt = f"https://127.0.0.1:{mgmt_port}"
    status_env = {"SKM_ADDR": mgmt, "SKM_TOKEN": token, "SKM_CACERT": str(ca)}

    async with process("server", "run", "-c", str(ks_toml)) as ks:
        t0 = time.monotonic()
        # Up, and its first unseal attempt made (the reason says why it is sealed).
        while (got := await health(mgmt, ca)) is None or "unreachable" not in got[1].get("reason", ""):
            assert ks.returncode is None and time.monotonic() - t0 < DEADLINE, f"key server did not start: {got}"
            await asyncio.sleep(0.1)
        status, body = await health(mgmt, ca)
        assert status == 503 and body["sealed"] is True and "unreachable" in body["reason"]
        status, body = await health(f"https://127.0.0.1:{data_port}", ca)
        assert status == 503 and body["sealed"] is True
        async with aiohttp.ClientSession() as s:
            async with s.get(mgmt + "/api/v1/keystores", ssl=client_context(ca),
                             headers={"Authorization": f"Bearer {token}"}) as r:
                env = await r.json(content_type=None)
                assert r.status == 503 and env["header"]["resultMessage"] == "Sealed"
                assert "unreachable" in env["header"]["resultDetail"]
        code, out, err = await run_cli("server", "status", "--json", env=status_env)
        assert code == 6 and '"sealed": true' in out

        async with process("systemkey", "run", "-c", str(sk_toml)) as sk:
            t0 = time.monotonic()
            while (await health(mgmt, ca))[0] != 200:
                assert sk.returncode is None, (await sk.stderr.read()).decode()
                assert time.monotonic() - t0 < DEADLINE, "did not unseal after the system-key server started"
                await asyncio.sleep(0.1)
            code, out, err = await run_cli("server", "status", "--json", env=status_env)
            assert code == 0, err
            assert '"sealed": false' in out and '"system_key_version": 1' in out
        # once unsealed, the system-key server going away does not reseal a running key server
        assert (await health(mgmt, ca))[0] == 200
        ks.send_signal(2)
        assert await asyncio.wait_for(ks.wait(), 15) == 0
    audit = SystemKeyState(load(SystemKeyServerConfig, sk_toml, env={})).audit_records()
    assert [r["result"] for r in audit] == ["allowed"]


# --- PKCS#11 root key -------------------------------------------------------------------
@pytest.fixture
def token(softhsm: SoftHSM, monkeypatch: pytest.MonkeyPatch):
    t = softhsm.new_token()
    monkeypatch.setenv("SKM_TEST_PKCS11_PIN", t.pin)
    return t


def rootkey_overrides(softhsm: SoftHSM, token) -> dict:
    import dataclasses
    return dataclasses.asdict(softhsm.config(token))


async def test_unseal_through_softhsm_root_key(tmp_path: Path, softhsm: SoftHSM, token):
    from server.barrier.pkcs11 import generate_root_key
    await generate_root_key(softhsm.config(token))
    async with stack_of(tmp_path, rootkey=rootkey_overrides(softhsm, token)) as st:
        assert not st.ks_cfg.root_key_path().exists()  # no root-key file: it lives in the token
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        assert type(h.server.root).__name__ == "PKCS11RootKey"
        key_id = await secret_round_trip(h, "sealed-under-hsm")
        await st.stop_keyserver()
        # a fresh process state: the same token unseals again, the data reads back
        h = await st.start_keyserver()
        await wait_unsealed(h)
        st_, body = await h.client("GET", f"/secrets/{key_id}")
        assert st_ == 200 and body["body"]["secret"] == "sealed-under-hsm"


async def test_wrong_pin_is_a_clear_start_up_error(tmp_path: Path, softhsm: SoftHSM, token):
    from server.barrier.pkcs11 import generate_root_key
    await generate_root_key(softhsm.config(token))
    rk = rootkey_overrides(softhsm, token)
    # local keyring: `skm server run` refuses to start and says why
    cfg = make_config(tmp_path / "local", rootkey=rk)
    await init_server(cfg)
    toml = write_toml(tmp_path / "local.toml", f'''data_dir = "{cfg.data_dir}"
[data]
port = 0
[mgmt]
port = 0
[rootkey]
provider = "pkcs11"
module = "{rk['module']}"
token_label = "{rk['token_label']}"
key_label = "{rk['key_label']}"
pin_env = "SKM_TEST_PKCS11_PIN"
''')
    code, out, err = await run_cli("server", "run", "-c", str(toml), env={"SKM_TEST_PKCS11_PIN": "9999-0000"},
                                   timeout=30)
    assert code == 1
    assert f"the PIN for PKCS#11 token {rk['token_label']!r} was refused" in err
    assert "environment variable SKM_TEST_PKCS11_PIN" in err and "Traceback" not in err and "9999" not in err
    # remote keyring: the key server comes up sealed with that reason and does not retry
    async with stack_of(tmp_path / "remote", rootkey=rk) as st:
        await st.start_systemkey()
        os.environ["SKM_TEST_PKCS11_PIN"] = "9999-0000"  # restored by monkeypatch
        h = await st.start_keyserver()
        await wait_sealed_reason(h, "cannot unseal")
        await assert_sealed_everywhere(h, f"the PIN for PKCS#11 token {rk['token_label']!r} was refused")
        # It does not retry: the unseal task has ended (not sleeping until a next attempt), no fetch was made.
        unseal = [t for t in h.server._tasks if t.get_name() == "unseal"]
        assert len(unseal) == 1 and unseal[0].done() and unseal[0].exception() is None
        assert len(SystemKeyState(st.sk_cfg).audit_records()) == 0  # refused before any fetch
