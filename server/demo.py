"""`skm demo`: the whole stack on the embedded default, and an app using it.

Starts the key server (SQLite, file root key, dev CA) in a data dir, creates a
demo key store with a secret, a symmetric and an asymmetric key, and walks an
app through the client API: read the secret, encrypt/decrypt, envelope-encrypt
with a local key, sign/verify, rotate, decrypt old ciphertext.
"""
from __future__ import annotations

import asyncio
import base64
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
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


class Demo:
    def __init__(self, data_dir: Path, console: Console, port_data: int = 0, port_mgmt: int = 0) -> None:
        self.data_dir = data_dir
        self.console = console
        self.cfg = load(ServerConfig, None, overrides={
            "data_dir": str(data_dir), "data": {"port": port_data}, "mgmt": {"port": port_mgmt},
            "log_level": "warning"})
        self.server: KeyServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.appkey = ""
        self.token = ""
        self.result = DemoResult()

    async def start(self) -> None:
        from server.access.operators import Operators
        from server.init import init_server
        if not self.cfg.system_key_path().exists():
            res = await init_server(self.cfg, operator="demo-admin")
            self.appkey, self.token = res.appkey, res.token
        self.server = await KeyServer(self.cfg).start()
        rt = self.server.runtime
        if not self.token:
            ops = Operators(rt.storage)
            self.token = await ops.issue_token(await ops.by_name("demo-admin"), "skm demo", ttl_days=1)
            self.appkey = (await rt.keys.default_project()).appkey
        ca = self.cfg.pki_dir() / "ca.pem"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(ca)),
                                             timeout=aiohttp.ClientTimeout(total=30))

    async def stop(self) -> None:
        if self.session:
            await self.session.close()
        if self.server:
            await self.server.stop()

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

    def app(self, method: str, path: str, body: Any = None) -> Awaitable[dict]:
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
                                                             "ip4AuthUse": "Y"})
            await self.admin("POST", f"/keystores/{store['keyStoreId']}/auths/ipv4s",
                             {"value": "127.0.0.1", "description": "this machine"})
        keys = {k["name"]: k for k in (await self.admin("GET", f"/keystores/{store['keyStoreId']}/keys"))["keyList"]}
        wanted = {"db-password": {"keyType": "SECRET", "secretValue": "s3cr3t-" + base64.b32encode(os.urandom(5)).decode()},
                  "data-key": {"keyType": "SYMMETRIC_KEY"},
                  "signing-key": {"keyType": "ASYMMETRIC_KEY", "keySpec": "RSA-2048"}}
        for name, spec in wanted.items():
            if name not in keys:
                keys[name] = await self.admin("POST", f"/keystores/{store['keyStoreId']}/keys", {"name": name, **spec})
        return {"store": store, **keys}

    async def run_flow(self) -> DemoResult:
        c = self.console
        c.print(f"[bold]Secure Key Manager demo[/bold] — data dir {self.data_dir}")
        k = await self.setup_store()
        sec, sym, asym = k["db-password"]["keyId"], k["data-key"]["keyId"], k["signing-key"]["keyId"]
        c.print(f"key store [bold]demo[/bold] (id {k['store']['keyStoreId']}), appkey {self.appkey}")
        state: dict[str, Any] = {}

        async def read_secret() -> str:
            value = (await self.app("GET", f"/secrets/{sec}"))["secret"]
            return f"app read db-password ({len(value)} characters, value not shown)"

        async def encrypt() -> str:
            out = await self.app("POST", f"/symmetric-keys/{sym}/encrypt", {"plaintext": "card 4111-1111"})
            state["ct"] = out["ciphertext"]
            back = await self.app("POST", f"/symmetric-keys/{sym}/decrypt", {"ciphertext": out["ciphertext"]})
            assert back["plaintext"] == "card 4111-1111", "decrypt did not return the plaintext"
            return f"encrypted with version {out['keyVersion']} and decrypted back"

        async def envelope() -> str:
            lk = await self.app("POST", f"/symmetric-keys/{sym}/create-local-key")
            data = b"a large file's contents " * 1000
            nonce = os.urandom(12)
            blob = AESGCM(base64.b64decode(lk["localKeyPlaintext"])).encrypt(nonce, data, None)
            # Later: only the wrapped local key is stored beside the data.
            dk = await self.app("POST", f"/symmetric-keys/{sym}/decrypt", {"ciphertext": lk["localKeyCiphertext"]})
            assert AESGCM(base64.b64decode(dk["plaintext"])).decrypt(nonce, blob, None) == data
            return f"{len(data)} bytes encrypted locally under a data key; the key server only unwrapped the key"

        async def sign() -> str:
            s = await self.app("POST", f"/asymmetric-keys/{asym}/sign", {"plaintext": "release v1.2.3"})
            state["sig"] = s["signature"]
            v = await self.app("POST", f"/asymmetric-keys/{asym}/verify",
                               {"plaintext": "release v1.2.3", "signature": s["signature"]})
            bad = await self.app("POST", f"/asymmetric-keys/{asym}/verify",
                                 {"plaintext": "release v6.6.6", "signature": s["signature"]})
            assert v["result"] and not bad["result"], "verify gave the wrong answer"
            return "signed with RSA-2048; verify: true for the message, false for another"

        async def rotate() -> str:
            before = (await self.admin("GET", f"/keys/{sym}"))["currentKeyValueVersion"]
            after = (await self.admin("POST", f"/keys/{sym}/rotate"))["currentKeyValueVersion"]
            await self.admin("POST", f"/keys/{asym}/rotate")
            old = await self.app("POST", f"/symmetric-keys/{sym}/decrypt", {"ciphertext": state["ct"]})
            assert old["plaintext"] == "card 4111-1111"
            v = await self.app("POST", f"/asymmetric-keys/{asym}/verify",
                               {"plaintext": "release v1.2.3", "signature": state["sig"]})
            assert v["result"]
            return (f"data-key rotated {before} → {after}; old ciphertext still decrypts (version "
                    f"{old['keyVersion']}), old signature still verifies")

        async def refused() -> str:
            try:
                await self.app("GET", f"/symmetric-keys/{sym}/symmetric-key")
            except DemoRefused as e:
                return f"export of a non-exportable key refused ({e.message}, HTTP 403)"
            raise AssertionError("a non-exportable key was exported")

        for title, fn in (("fetch a secret", read_secret), ("encrypt / decrypt", encrypt),
                          ("envelope encryption", envelope), ("sign / verify", sign),
                          ("rotate and use old versions", rotate), ("key material stays inside", refused)):
            await self.step(title, fn)
        return self.result


async def run_demo(data_dir: str | None, once: bool, console: Console | None = None,
                   port_data: int = 8443, port_mgmt: int = 8444) -> int:
    console = console or Console()
    tmp = None
    if once and data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="skm-demo-")
        path = Path(tmp.name)
        port_data = port_mgmt = 0
    else:
        path = Path(data_dir or ".skm")
    demo = Demo(path, console, port_data, port_mgmt)
    try:
        await demo.start()
        result = await demo.run_flow()
        if once:
            console.print("[bold green]demo passed[/bold green]" if result.ok else "[bold red]demo failed[/bold red]")
            return 0 if result.ok else 1
        console.print(f"\nServing. Data plane: {demo.data_url}\nManagement: {demo.mgmt_url}\n"
                      f"CA: {demo.cfg.pki_dir() / 'ca.pem'}\n"
                      f"Try:  SKM_ADDR=https://127.0.0.1:{demo.server.mgmt_port} SKM_CACERT={demo.cfg.pki_dir() / 'ca.pem'} "
                      f"SKM_TOKEN=<token below> skm keystore list\n"
                      f"Operator token (demo only, valid 1 day): {demo.token}\nPress Ctrl-C to stop.")
        await asyncio.Event().wait()
        return 0
    finally:
        await demo.stop()
        if tmp is not None:
            tmp.cleanup()
