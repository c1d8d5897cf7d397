"""`skm demo`: the whole stack on the embedded default, and an app using it through the sidecar.

Three places, three roles: the system-key server runs as its own process with
the wrapped system key; the key server (SQLite, file root key, dev CA) starts
sealed and unseals by fetching it over mTLS; a sidecar holds the host's client
certificate and serves the demo app on a Unix socket. The app never sees a
credential: it reads a secret, encrypts, envelope-encrypts, signs, and keeps
working across a rotation.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime as dt
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from rich.console import Console

from server.access.tls import client_context
from server.app import KeyServer
from server.config import load
from server.settings import ServerConfig


class DemoRefused(Exception):
    def __init__(self, message: str, detail: str) -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.message = message


@dataclass
class DemoResult:
    steps: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEMO_OPERATOR = "demo-admin"
TOKEN_DESCRIPTION = "skm demo"
TOKEN_TTL_DAYS = 1


def _die_with_parent() -> None:
    """In the system-key server's child process: a SIGTERM when the demo dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG


async def _wait_listening(port: int, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    """Until the system-key server accepts connections: the key server then fetches on its first try,
    so the demo shows no expected start-up retries as warnings."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"the system-key server exited ({proc.returncode}); is port {port} in use? "
                               "Choose other ports with `skm demo --port`")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            return
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the system-key server did not listen on port {port} in {timeout:.0f}s") from None
            await asyncio.sleep(0.05)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Demo:
    def __init__(self, data_dir: Path, console: Console, port_data: int = 0, port_mgmt: int = 0,
                 port_systemkey: int = 0) -> None:
        self.dir = data_dir
        self.console = console
        self.sk_port = port_systemkey or _free_port()
        self.cfg = load(ServerConfig, None, env={}, overrides={
            "data_dir": str(data_dir / "keyserver"), "data": {"port": port_data}, "mgmt": {"port": port_mgmt},
            "log_level": "warning",
            "systemkey": {"source": "remote", "urls": [f"https://127.0.0.1:{self.sk_port}"],
                          "retry_initial": 0.1, "retry_max": 1.0}})
        self.sk_dir = data_dir / "systemkey"
        self.app_dir = data_dir / "app"
        self.server: KeyServer | None = None
        self.systemkey: asyncio.subprocess.Process | None = None
        self.sidecar = None
        self.session: aiohttp.ClientSession | None = None
        self.appkey = ""
        self.token = ""
        self.token_expires: dt.datetime | None = None
        self.password = ""
        self.result = DemoResult()

    # ------------------------------------------------------------------ set-up
    async def _first_run(self) -> None:
        """Key server init, then move its wrapped keyring to the system-key server's state."""
        from server.cli.cmd_server import export_keyring
        from server.cli.cmd_systemkey import issue_certificate
        from server.init import init_server
        from server.systemkey import admin
        res = await init_server(self.cfg, operator=DEMO_OPERATOR)
        self.appkey = res.appkey
        exported = self.dir / "exported-keyring.json"
        export_keyring(self.cfg, exported)
        sk = self._sk_config()
        admin.init_from_file(sk, exported)
        exported.unlink()
        issue_certificate(sk, self.cfg.pki_dir())
        admin.allow(sk, str(self.cfg.pki_dir() / "server.pem"), "demo key server")

    def _sk_config(self):
        from server.systemkey.settings import SystemKeyServerConfig
        return load(SystemKeyServerConfig, None, env={}, overrides={
            "data_dir": str(self.sk_dir), "port": self.sk_port, "log_level": "warning"})

    async def start(self) -> None:
        if not (self.cfg.data_path / "skm.db").exists():
            await self._first_run()
        conf = self.dir / "systemkey.toml"
        conf.write_text(f'data_dir = "{self.sk_dir}"\nport = {self.sk_port}\nlog_level = "warning"\n')
        # The system-key server is its own process, as it would be its own host. In a session of its own:
        # Ctrl-C reaches the terminal's whole process group, and the system-key server must outlive the
        # key server's stop (its last audit checkpoint goes there); `stop()` ends it after, and it still
        # gets a SIGTERM if the demo dies.
        self.systemkey = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli.main", "systemkey", "run", "--config", str(conf),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
            start_new_session=True)
        await _wait_listening(self.sk_port, self.systemkey)
        self.server = await KeyServer(self.cfg).start()
        rt = self.server.runtime
        started = time.monotonic()
        while rt.barrier.sealed:
            if time.monotonic() - started > 20:
                raise RuntimeError(f"the key server did not unseal: {rt.barrier.sealed_reason}")
            await asyncio.sleep(0.1)
        self.console.print(f"[green]✓[/green] key server unsealed with the system key fetched from the system-key "
                           f"server (pid {self.systemkey.pid}) in {time.monotonic() - started:.1f}s")
        await self._login()
        if not self.appkey:
            self.appkey = (await rt.keys.default_project()).appkey
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(self.ca)),
                                             timeout=aiohttp.ClientTimeout(total=30))

    async def _login(self) -> None:
        """A way into the console and the CLI for this run: a fresh password and one token for the demo
        operator. Earlier runs' tokens are revoked (and so is `init`'s bootstrap token), so they never pile up."""
        ops = self.server.runtime.operators
        op = await ops.by_name(DEMO_OPERATOR)
        for t in await ops.tokens(op.id):
            if t["status"] == "ACTIVE":
                await ops.revoke_token(t["tokenId"])
        self.password = secrets.token_urlsafe(15)
        await ops.update(DEMO_OPERATOR, password=self.password, unlock=True)
        self.token = await ops.issue_token(op, TOKEN_DESCRIPTION, ttl_days=TOKEN_TTL_DAYS)
        self.token_expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=TOKEN_TTL_DAYS)

    @property
    def ca(self) -> Path:
        return self.cfg.pki_dir() / "ca.pem"

    async def start_sidecar(self, store_id: int) -> None:
        """Issue the host's client certificate for the store and hand it to the sidecar only."""
        from sidecar.app import Sidecar
        from sidecar.settings import load_config
        p12, pw = self.app_dir / "host.p12", self.app_dir / "host.p12.password"
        if not p12.exists():
            password = secrets.token_urlsafe(18)
            await self.admin("POST", f"/keystores/{store_id}/certificates",
                             {"name": "demo-host", "password": password, "lifeTime": 30})
            async with self.session.get(f"{self.mgmt_url}/keystores/{store_id}/certificates/demo-host/bundle",
                                        headers={"Authorization": f"Bearer {self.token}"}) as r:
                _write_private(p12, await r.read())
            _write_private(pw, password.encode())
        sock = self.app_dir / "sidecar.sock"
        cfg = load_config(None, env={}, overrides={
            "appkey": self.appkey, "log_level": "warning",
            "upstream": {"urls": [f"https://127.0.0.1:{self.server.data_port}"], "ca": str(self.ca),
                         "pkcs12": str(p12), "pkcs12_password_file": str(pw)},
            "listen": {"socket": str(sock)}})
        self.sidecar = await Sidecar(cfg).start()

    async def stop(self) -> None:
        if self.session:
            await self.session.close()
        if self.sidecar:
            await self.sidecar.stop()
        if self.server:
            await self.server.stop()
        if self.systemkey and self.systemkey.returncode is None:
            self.systemkey.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.systemkey.wait(), 5)
            if self.systemkey.returncode is None:
                self.systemkey.kill()
                await self.systemkey.wait()

    # ------------------------------------------------------------------- calls
    @property
    def data_url(self) -> str:
        return f"https://127.0.0.1:{self.server.data_port}/keymanager/v1.0/appkey/{self.appkey}"

    @property
    def mgmt_url(self) -> str:
        return f"https://127.0.0.1:{self.server.mgmt_port}/api/v1"

    async def _call(self, method: str, url: str, body: Any = None, token: bool = False) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        async with self.session.request(method, url, json=body, headers=headers) as r:
            env = await r.json(content_type=None)
            if not env["header"]["isSuccessful"]:
                raise DemoRefused(env["header"]["resultMessage"], env["header"].get("resultDetail", ""))
            return env["body"]

    def direct(self, method: str, path: str, body: Any = None) -> Awaitable[dict]:
        """The app calling the key server itself, without the sidecar (and so without a certificate)."""
        return self._call(method, self.data_url + path, body)

    def admin(self, method: str, path: str, body: Any = None) -> Awaitable[dict]:
        return self._call(method, self.mgmt_url + path, body, token=True)

    async def step(self, title: str, fn: Callable[[], Awaitable[str]]) -> None:
        try:
            detail = await fn()
            self.result.steps.append((title, True, detail))
            self.console.print(f"[green]✓[/green] {title}: {detail}")
        except Exception as e:  # a demo step reports and the run goes on
            self.result.steps.append((title, False, str(e)))
            self.console.print(f"[red]✗[/red] {title}: {e}")

    async def setup_store(self) -> dict:
        stores = (await self.admin("GET", "/keystores"))["keyStoreList"]
        store = next((s for s in stores if s["name"] == "demo"), None)
        if store is None:
            store = await self.admin("POST", "/keystores", {"name": "demo", "description": "skm demo",
                                                             "ip4AuthUse": "Y", "certificateAuthUse": "Y"})
            await self.admin("POST", f"/keystores/{store['keyStoreId']}/auths/ipv4s",
                             {"value": "127.0.0.1", "description": "this machine"})
        keys = {k["name"]: k for k in (await self.admin("GET", f"/keystores/{store['keyStoreId']}/keys"))["keyList"]}
        wanted = {"db-password": {"keyType": "SECRET",
                                  "secretValue": "s3cr3t-" + base64.b32encode(os.urandom(5)).decode()},
                  "data-key": {"keyType": "SYMMETRIC_KEY"},
                  "signing-key": {"keyType": "ASYMMETRIC_KEY", "keySpec": "RSA-2048"}}
        for name, spec in wanted.items():
            if name not in keys:
                keys[name] = await self.admin("POST", f"/keystores/{store['keyStoreId']}/keys", {"name": name, **spec})
        return {"store": store, **keys}

    async def run_flow(self) -> DemoResult:
        from sidecar.client import AsyncSidecarClient, SidecarError
        c = self.console
        k = await self.setup_store()
        sec, sym, asym = k["db-password"]["keyId"], k["data-key"]["keyId"], k["signing-key"]["keyId"]
        await self.start_sidecar(k["store"]["keyStoreId"])
        c.print(f"key store [bold]demo[/bold] (id {k['store']['keyStoreId']}, IPv4 + client certificate), "
                f"appkey {self.appkey}; the app talks to the sidecar at {self.app_dir / 'sidecar.sock'}")
        app = AsyncSidecarClient(str(self.app_dir / "sidecar.sock"), envelope_key_id=sym)
        state: dict[str, Any] = {}

        async def read_secret() -> str:
            value = await app.get_secret(sec)
            return f"app read db-password through the sidecar ({len(value)} characters, value not shown)"

        async def refused_direct() -> str:
            try:
                await self.direct("GET", f"/secrets/{sec}")
            except DemoRefused as e:
                return f"the same app calling the key server directly is refused ({e.message})"
            raise AssertionError("the key server served a client without the host certificate")

        async def encrypt() -> str:
            state["ct"] = await app.encrypt(sym, "card 4111-1111")
            assert await app.decrypt(sym, state["ct"]) == "card 4111-1111", "decrypt did not round-trip"
            return "encrypted and decrypted back"

        async def envelope() -> str:
            data = b"a large file's contents " * 1000
            blob = await app.envelope_encrypt(data)
            assert await app.envelope_decrypt(blob) == data
            return f"{len(data)} bytes sealed locally under a one-time data key; only the data key went to the server"

        async def sign() -> str:
            state["sig"] = await app.sign(asym, "release v1.2.3")
            ok = await app.verify(asym, "release v1.2.3", state["sig"])
            bad = await app.verify(asym, "release v6.6.6", state["sig"])
            assert ok and not bad, "verify gave the wrong answer"
            return "signed with RSA-2048; verify: true for the message, false for another"

        async def rotate() -> str:
            before = (await self.admin("GET", f"/keys/{sym}"))["currentKeyValueVersion"]
            after = (await self.admin("POST", f"/keys/{sym}/rotate"))["currentKeyValueVersion"]
            await self.admin("POST", f"/keys/{asym}/rotate")
            assert await app.decrypt(sym, state["ct"]) == "card 4111-1111"
            assert await app.verify(asym, "release v1.2.3", state["sig"])
            fresh = base64.b64decode(await app.encrypt(sym, "x"))[:4]
            return (f"data-key rotated {before} → {after} (new ciphertext uses version {int.from_bytes(fresh, 'big')}); "
                    "old ciphertext still decrypts and the old signature still verifies")

        async def refused_export() -> str:
            try:
                await app._call("GET", f"/symmetric-keys/{sym}/symmetric-key")
            except SidecarError as e:
                return f"export of a non-exportable key refused ({e.result_message})"
            raise AssertionError("a non-exportable key was exported")

        try:
            for title, fn in (("fetch a secret", read_secret), ("no certificate, no secret", refused_direct),
                              ("encrypt / decrypt", encrypt), ("envelope encryption", envelope),
                              ("sign / verify", sign), ("rotate and use old versions", rotate),
                              ("key material stays inside", refused_export)):
                await self.step(title, fn)
        finally:
            await app.close()
        return self.result


async def run_demo(data_dir: str | None, once: bool, console: Console | None = None,
                   port_data: int = 8443, port_mgmt: int = 8444, port_systemkey: int = 8442) -> int:
    """Port 0 (any of them) picks a free port."""
    console = console or Console(soft_wrap=True)      # piped output keeps whole lines
    tmp = None
    if once and data_dir is None:
        # Unix socket paths are short (108 bytes): keep the temp dir near the root.
        tmp = tempfile.TemporaryDirectory(prefix="skm-demo-", dir="/tmp")
        path = Path(tmp.name)
        port_data = port_mgmt = port_systemkey = 0
    else:
        path = Path(data_dir or ".skm").resolve()
    path.mkdir(parents=True, exist_ok=True)
    demo = Demo(path, console, port_data, port_mgmt, port_systemkey)
    # SIGTERM as Ctrl-C: stop everything this demo started (the system-key server is a child process).
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        me.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    console.print(f"[bold]Secure Key Manager demo[/bold] — data dir {path}")
    try:
        await demo.start()
        result = await demo.run_flow()
        if once:
            console.print("[bold green]demo passed[/bold green]" if result.ok else "[bold red]demo failed[/bold red]")
            return 0 if result.ok else 1
        mgmt = f"https://127.0.0.1:{demo.server.mgmt_port}"
        expires = demo.token_expires.strftime("%Y-%m-%d %H:%M UTC")
        console.print(f"\nServing. Data plane: {demo.data_url}\nManagement and console: {mgmt}/console/\n"
                      f"Sidecar socket: {demo.app_dir / 'sidecar.sock'}\nCA: {demo.ca}\n"
                      f"Console login: {DEMO_OPERATOR} / {demo.password}\nCLI:", soft_wrap=True)
        # Plain print: a terminal narrower than the line must not get a wrapped (broken) command.
        print(f"export SKM_ADDR={mgmt} SKM_CACERT={demo.ca} SKM_TOKEN={demo.token}", flush=True)
        console.print(f"skm keystore list\n(the password and the token are for this demo only: the token expires "
                      f"{expires}; the next `skm demo` in {path} replaces both)\nPress Ctrl-C to stop.",
                      soft_wrap=True)
        await asyncio.Event().wait()
        return 0
    except asyncio.CancelledError:
        if not signalled:
            raise
        me.uncancel()
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await demo.stop()
        if tmp is not None:
            tmp.cleanup()
