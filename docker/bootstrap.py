"""Entry points of the compose demo's containers (`python3 /opt/skm/docker/bootstrap.py STEP`).

certs      (certs-init) the demo PKI, the root key and the wrapped system key, into /certs; once.
systemkey  (systemkey)  install the wrapped keyring and allow the key server's certificate, then serve.
provision  (keyserver)  once per database, under an advisory lock: the demo project, an admin
                        operator and token, a key store that trusts the sidecar's attested MAC,
                        a secret and a data-encryption key; their ids go to /shared/demo.json.
                        The secret is also the password of the database role demo_app (demo-psql logs in).
sidecar    (sidecar)    the sidecar with the appkey from /shared/demo.json.
rotate     (keyserver, by hand: `docker compose exec keyserver python3 /opt/skm/docker/bootstrap.py rotate`)
                        a new password for demo_app, set on the role and then stored with `skm key rotate`;
                        the sidecar re-renders the files that use it and signals demo-file-app.

Everything here is for the demo stack only; production hosts get their files by enrolment.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path

CERTS = Path(os.environ.get("SKM_DEMO_CERTS", "/certs"))
SHARED = Path(os.environ.get("SKM_DEMO_SHARED", "/shared"))
SIDECAR_MAC = os.environ.get("SKM_DEMO_SIDECAR_MAC", "02:42:0a:53:4b:4d")
PROVISION_LOCK = "skm-demo-provision"
DEMO_ROLE = "demo_app"          # the database role whose password is the demo secret (compose.yaml: demo-psql)


def _say(msg: str) -> None:
    print(f"[{sys.argv[1] if len(sys.argv) > 1 else 'bootstrap'}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ certs-init
async def certs() -> int:
    import subprocess
    from server.barrier.keyring import new_keyring, save_keyring_file
    from server.barrier.rootkey import FileRootKey

    done = CERTS / ".complete"
    if done.exists():
        _say(f"{CERTS} already holds the demo PKI; nothing to do")
        return 0
    # `skm certs init`: CA, server.pem (key server; server and client use, so it also
    # authenticates to the system-key server), systemkey.pem, and sidecar.pem binding the MAC.
    # --force: a run that stopped half-way left no .complete marker and starts over.
    p = subprocess.run([sys.executable, "-m", "server.cli.main", "certs", "init", "--dir", str(CERTS), "--force",
                        "--hostname", "keyserver", "--hostname", "systemkey",
                        "--host", "sidecar", "--mac", SIDECAR_MAC], stdout=sys.stderr)
    if p.returncode != 0:
        return p.returncode
    root = FileRootKey.create(CERTS / "root.key")
    save_keyring_file(CERTS / "systemkey-keyring.json", await new_keyring(root))
    await root.close()
    done.write_text("ok\n")
    _say(f"demo PKI (skm certs init), root key and wrapped system key written to {CERTS}")
    return 0


# ------------------------------------------------------------------ systemkey
async def systemkey() -> int:
    from server import logs
    from server.systemkey import admin
    from server.systemkey.app import serve
    from server.systemkey.settings import load
    from server.systemkey.state import SystemKeyState

    cfg = load(os.environ.get("SKM_SYSTEMKEY_CONFIG", "/etc/skm/systemkey.toml"))
    if not SystemKeyState(cfg).exists():
        admin.init_from_file(cfg, CERTS / "systemkey-keyring.json")
        _say("system-key state initialised from the wrapped keyring")
    if admin.allow(cfg, str(CERTS / "server.pem"), "compose keyserver"):
        _say("allowed the key server's client certificate")
    logs.configure(cfg.log_format, cfg.log_level)
    runner, port = await serve(cfg)
    _say(f"serving https://{cfg.host}:{port}")
    # As `skm systemkey run` does. Here it matters more: as a container's PID 1 the process gets no default
    # action for SIGTERM, so without a handler `docker stop` waits its whole timeout and then kills.
    await _until_signalled()
    await runner.cleanup()
    _say("stopped")
    return 0


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ------------------------------------------------------------------ provision
async def _wait_healthy(url: str, ca: Path, timeout: float = 120.0) -> None:
    import aiohttp
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        while True:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} not healthy after {timeout:.0f}s")
            await asyncio.sleep(0.5)


async def _wait_seal_key(storage, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while await storage.fetchval("SELECT key_sealed FROM access_seal WHERE id = 1") is None:
        if time.monotonic() > deadline:
            raise SystemExit("no key server made the access seal key; see the keyserver logs")
        await asyncio.sleep(0.5)


async def provision() -> int:
    import aiohttp
    import asyncpg
    from server.access.operators import Operators
    from server.access.seal import AccessSeal
    from server.backup.keys import unsealed_barrier
    from server.config import load
    from server.errors import NotFound
    from server.keys.service import KeyService
    from server.settings import ServerConfig
    from server.storage.factory import open_storage
    from server.storage.postgres import lock_key

    cfg = load(ServerConfig, os.environ.get("SKM_CONFIG", "/etc/skm/keyserver.toml"))
    mgmt = f"https://127.0.0.1:{cfg.mgmt.port}"
    ca = CERTS / "ca.pem"
    await _wait_healthy(f"{mgmt}/healthz", ca)
    out = SHARED / "demo.json"
    lock = await asyncpg.connect(cfg.storage_url(), timeout=10)
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", lock_key(PROVISION_LOCK))   # replicas queue here
        if out.exists():
            _say("demo already provisioned")
            return 0
        storage = open_storage(cfg.storage_url())
        await storage.open()
        try:
            # Operator rows are sealed (server/access/seal.py): written with the system key, as the key
            # server writes them, once a replica has made the seal key (and recorded that in the audit).
            await _wait_seal_key(storage)
            async with unsealed_barrier(cfg) as barrier:
                seal = AccessSeal(storage, barrier)
                keys = KeyService(storage, barrier, seal=seal)
                project = next((p for p in await keys.projects() if p.name == "demo"), None) \
                    or await keys.create_project("demo")
                ops = Operators(storage, seal=seal)
                try:
                    op = await ops.by_name("admin")
                except NotFound:
                    op = await ops.create("admin", "admin")
                token = await ops.issue_token(op, "compose demo bootstrap", ttl_days=30)
        finally:
            await storage.close()
        ctx = ssl.create_default_context(cafile=str(ca))
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=30)) as s:
            async def call(method: str, path: str, body: dict) -> dict:
                async with s.request(method, f"{mgmt}/api/v1{path}", json=body) as r:
                    env = await r.json(content_type=None)
                    if not env["header"]["isSuccessful"]:
                        raise SystemExit(f"{method} {path}: {env['header']['resultMessage']} "
                                         f"{env['header'].get('resultDetail', '')}")
                    return env["body"]

            store = await call("POST", "/keystores", {
                "name": "demo", "description": "docker compose demo", "appkey": project.appkey,
                "macAuthUse": "Y", "macVerification": "attested"})
            sid = store["keyStoreId"]
            await call("POST", f"/keystores/{sid}/auths/macs", {"value": SIDECAR_MAC, "description": "sidecar"})
            password = os.urandom(12).hex()
            await _set_role_password(lock, password)
            secret = await call("POST", f"/keystores/{sid}/keys", {
                "keyType": "SECRET", "name": "db-password", "secretValue": password})
            kek = await call("POST", f"/keystores/{sid}/keys", {"keyType": "SYMMETRIC_KEY", "name": "data-key"})
        token_file = SHARED / "admin-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"appkey": project.appkey, "keystore_id": sid, "secret_key_id": secret["keyId"],
                                   "envelope_key_id": kek["keyId"]}, indent=2) + "\n")
        os.replace(tmp, out)      # readers see all of it or nothing
        _say(f"provisioned key store {sid} with a secret and a data key; ids in {out}")
        return 0
    finally:
        await lock.close()


async def _set_role_password(conn, password: str) -> None:
    """Create or alter the demo role: it may log in to the database and do nothing else (no grants)."""
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DEMO_ROLE)
    # Utility statements take no parameters: quote on the server (%I, %L) rather than by hand here.
    sql = await conn.fetchval("SELECT format('%s ROLE %I LOGIN PASSWORD %L', $1::text, $2::text, $3::text)",
                              "ALTER" if exists else "CREATE", DEMO_ROLE, password)
    await conn.execute(sql)


# ------------------------------------------------------------------ rotate
async def rotate() -> int:
    """A new demo password: on the database role first, then into the key store with `skm key rotate`.

    Between the two steps (well under a second) and until the sidecar has rendered the new file,
    a login with the old file is refused; run this again if the second step fails.
    """
    import asyncpg
    from server.config import load
    from server.settings import ServerConfig

    cfg = load(ServerConfig, os.environ.get("SKM_CONFIG", "/etc/skm/keyserver.toml"))
    demo = json.loads((SHARED / "demo.json").read_text())
    password = os.urandom(16).hex()      # 32 characters (the first one had 24): the demo apps show the change
    conn = await asyncpg.connect(cfg.storage_url(), timeout=10)
    try:
        await _set_role_password(conn, password)
    finally:
        await conn.close()
    _say(f"new password set on database role {DEMO_ROLE}")
    env = {k: v for k, v in os.environ.items() if k != "SKM_CONFIG"}     # SKM_CONFIG here is the server's file
    env.update(SKM_ADDR=f"https://127.0.0.1:{cfg.mgmt.port}", SKM_CACERT=str(CERTS / "ca.pem"),
               SKM_TOKEN=(SHARED / "admin-token").read_text().strip())
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli.main", "key", "rotate", demo["secret_key_id"], "--value-file", "-",
        stdin=asyncio.subprocess.PIPE, env=env)
    await p.communicate(password.encode())
    if p.returncode != 0:
        _say("skm key rotate failed: the role has a password the key store does not; run this step again")
        return p.returncode or 1
    _say(f"rotated secret {demo['secret_key_id']} (demo/db-password) to the role's new password")
    return 0


# ------------------------------------------------------------------ sidecar
async def sidecar() -> int:
    demo = json.loads((SHARED / "demo.json").read_text())
    os.environ["SKM_SIDECAR_APPKEY"] = demo["appkey"]
    sock = Path(os.environ.get("SKM_SIDECAR_LISTEN_SOCKET", "/run/skm/sidecar.sock"))
    sock.parent.mkdir(parents=True, exist_ok=True)
    from sidecar.app import run
    from sidecar.settings import load_config
    return await run(load_config(os.environ.get("SKM_SIDECAR_CONFIG", "/etc/skm/sidecar.toml")))


STEPS = {"certs": certs, "systemkey": systemkey, "provision": provision, "sidecar": sidecar, "rotate": rotate}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STEPS:
        raise SystemExit(f"usage: bootstrap.py {{{'|'.join(STEPS)}}}")
    sys.exit(asyncio.run(STEPS[sys.argv[1]]()))
