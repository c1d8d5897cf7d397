"""Real server processes for the reliability suite: `skm server run` and the system-key server.

Subprocesses, because these tests kill -9, measure resident memory of the server
alone, run sync clients (schemathesis, sslyze) against it, and set OPENSSL_CONF
(read by OpenSSL once, at process start). Each process logs to a file in the
test's temp dir; the suite's hygiene collector greps those files at the end.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from server.access.pki import DevPKI, cert_pem, key_pem, write_pem
from server.access.tls import client_context
from server.config import load
from server.init import InitResult, init_server
from server.settings import ServerConfig

REPO = Path(__file__).resolve().parents[2]
SKM = Path(sys.executable).parent / "skm"
_LISTENING = re.compile(r"key server: data plane https://[^:]+:(\d+), management https://[^:]+:(\d+)")
# Mozilla "intermediate" wants X25519/P-256/P-384 only; Python 3.11 cannot set groups (platform-notes).
OPENSSL_GROUPS_CONF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Groups = X25519:P-256:P-384
"""


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict) -> None:
    top = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_") and k != "OPENSSL_CONF"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def server_command(config_path: Path, env: dict[str, str], log: Path) -> list[str]:
    """`skm server run`, or, when the test run sets SKM_MEMPROBE_OUT, the same under
    tests/reliability/memprobe.py (an investigation hook read by this harness, never by the server's
    config): its report goes to `<SKM_MEMPROBE_OUT>.<log name>`, the other SKM_MEMPROBE_* pass through."""
    out = os.environ.get("SKM_MEMPROBE_OUT")
    if not out:
        return [str(SKM), "server", "run", "--config", str(config_path)]
    env.update({k: v for k, v in os.environ.items() if k.startswith("SKM_MEMPROBE_")})
    env["SKM_MEMPROBE_OUT"] = f"{out}.{log.stem}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "tests.reliability.memprobe", "server", "run", "--config", str(config_path)]


def openssl_conf(tmp: Path) -> Path:
    p = tmp / "openssl-groups.cnf"
    p.write_text(OPENSSL_GROUPS_CONF)
    return p


def spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A child in its own session (a signal to the test run does not reach it), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


async def wait_for_log(proc: subprocess.Popen, log: Path, pattern: "re.Pattern[str] | str", what: str,
                       timeout: float) -> "re.Match[str] | str":
    """The first match of `pattern` in `log` (or the marker string itself); a clear error when `proc`
    exits first or `timeout` passes, with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = pattern.search(text) if not isinstance(pattern, str) else (pattern if pattern in text else None)
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{text[-3000:]}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


async def terminate(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout`; nothing when it is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Child:
    """What the test processes share: `proc`, stopped with SIGTERM (then SIGKILL), its pid and RSS."""
    proc: subprocess.Popen | None

    async def stop(self) -> None:
        await terminate(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)


@dataclass
class ServerProcess(_Child):
    tmp: Path
    config_path: Path
    config: ServerConfig
    init: InitResult
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    data_port: int = 0
    mgmt_port: int = 0
    starts: int = 0
    log_paths: list[Path] = field(default_factory=list)
    harvested: bool = False           # the hygiene collector has its material already

    @classmethod
    async def create(cls, tmp: Path, *, storage: str | None = None, env: dict[str, str] | None = None,
                     init: bool = True, **overrides: Any) -> "ServerProcess":
        tmp.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"data_dir": str(tmp / "data"), "purge_interval": 3600.0, "log_format": "json",
                                "log_level": "debug", "data": {"port": 0}, "mgmt": {"port": 0}}
        if storage:
            data["storage"] = storage
        for k, v in overrides.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
        path = tmp / "server.toml"
        write_toml(path, data)
        cfg = load(ServerConfig, path, env={})
        result = await init_server(cfg) if init else None
        return cls(tmp, path, cfg, result, clean_env(env))

    # -- life cycle --------------------------------------------------------------------
    async def start(self, *, wait_unsealed: bool = True, timeout: float = 30) -> "ServerProcess":
        self.starts += 1
        log = self.tmp / f"server-{self.starts}.log"
        self.log_paths.append(log)
        env = dict(self.env)
        self.proc = spawn(server_command(self.config_path, env, log), log, env, self.tmp)
        deadline = time.monotonic() + timeout
        m = await wait_for_log(self.proc, log, _LISTENING, "skm server run", timeout)
        self.data_port, self.mgmt_port = int(m.group(1)), int(m.group(2))
        if wait_unsealed:
            await self.wait_unsealed(deadline - time.monotonic())
        return self

    async def health(self) -> tuple[int, dict]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl())) as s:
            async with s.get(f"{self.mgmt_url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await r.json(content_type=None)

    async def wait_unsealed(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                st, last = await self.health()
                if st == 200:
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = e
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server did not unseal within {timeout}s: {last}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=20)


    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())

    # -- clients -----------------------------------------------------------------------------
    @property
    def pki(self) -> DevPKI:
        return DevPKI(self.config.pki_dir())

    @property
    def ca(self) -> Path:
        return self.pki.ca_cert

    @property
    def data_url(self) -> str:
        return f"https://127.0.0.1:{self.data_port}"

    @property
    def mgmt_url(self) -> str:
        return f"https://127.0.0.1:{self.mgmt_port}"

    @property
    def token(self) -> str:
        return self.init.token

    @property
    def appkey(self) -> str:
        return self.init.appkey

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        return client_context(self.ca, cert, key)

    def client_cert(self, name: str = "client") -> tuple[Path, Path]:
        ca = self.pki.load_ca()
        cert, key = ca.issue(name, client=True)
        cp, kp = self.tmp / f"{name}.pem", self.tmp / f"{name}-key.pem"
        write_pem(cp, cert_pem(cert), private=False)
        write_pem(kp, key_pem(key), private=True)
        return cp, kp

    def session(self, cert: Path | None = None, key: Path | None = None, **kw: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl(cert, key), limit=kw.pop("limit", 100)),
                                     timeout=aiohttp.ClientTimeout(total=kw.pop("total", 30)), **kw)

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_path(self, path: str, version: str = "v1.0") -> str:
        return f"{self.data_url}/keymanager/{version}/appkey/{self.appkey}{path}"


async def mgmt(s: aiohttp.ClientSession, srv: ServerProcess, method: str, path: str, json: Any = None
               ) -> tuple[int, dict]:
    async with s.request(method, f"{srv.mgmt_url}/api/v1{path}", json=json, headers=srv.bearer()) as r:
        return r.status, await r.json(content_type=None)


async def setup_store(srv: ServerProcess, name: str = "store") -> dict:
    """A key store that admits loopback by IPv4 (the way the harness does it)."""
    async with srv.session() as s:
        st, out = await mgmt(s, srv, "POST", "/keystores", {"name": name, "ip4AuthUse": "Y"})
        assert st == 201, out
        ks = out["body"]
        st, out = await mgmt(s, srv, "POST", f"/keystores/{ks['keyStoreId']}/auths/ipv4s", {"value": "127.0.0.1"})
        assert st == 201, out
        return ks


# -- the system-key server as a process -------------------------------------------------------
_SK_MAIN = ("import asyncio, sys\n"
            "from server.systemkey.settings import load\n"
            "from server.systemkey.app import run\n"
            "asyncio.run(run(load(sys.argv[1])))\n")


@dataclass
class SystemKeyProcess:
    tmp: Path
    config_path: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    log_paths: list[Path] = field(default_factory=list)

    async def start(self, timeout: float = 20) -> "SystemKeyProcess":
        self.starts += 1
        log = self.tmp / f"systemkey-{self.starts}.log"
        self.log_paths.append(log)
        self.proc = spawn([sys.executable, "-c", _SK_MAIN, str(self.config_path)], log, self.env, REPO)
        await wait_for_log(self.proc, log, "system-key server listening", "system-key server", timeout)
        return self

    async def stop(self) -> None:
        await terminate(self.proc, 10)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())


# -- the sidecar as a process ------------------------------------------------------------------
_SIDECAR_SERVING = "sidecar: serving"


@dataclass
class SidecarProcess(_Child):
    """`skm sidecar --config FILE` in front of a ServerProcess, with a host certificate the key
    server issued for one key store (PKCS#12 bundle and password file, both 0600)."""
    tmp: Path
    config_path: Path
    socket: Path
    env: dict[str, str]
    password: str
    proc: subprocess.Popen | None = None
    starts: int = 0
    log_paths: list[Path] = field(default_factory=list)

    @classmethod
    async def create(cls, tmp: Path, srv: ServerProcess, keystore_id: int, *, name: str = "sidecar-host",
                     **settings: Any) -> "SidecarProcess":
        import secrets as _secrets
        tmp.mkdir(parents=True, exist_ok=True)
        password = _secrets.token_urlsafe(18)
        async with srv.session() as s:
            st, out = await mgmt(s, srv, "POST", f"/keystores/{keystore_id}/certificates",
                                 {"name": name, "password": password, "lifeTime": 30})
            assert st == 201, out
            async with s.get(f"{srv.mgmt_url}/api/v1/keystores/{keystore_id}/certificates/{name}/bundle",
                             headers=srv.bearer()) as r:
                assert r.status == 200, await r.text()
                bundle = await r.read()
        p12, pw = tmp / "host.p12", tmp / "host.p12.password"
        for path, data in ((p12, bundle), (pw, password.encode())):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        sock = tmp / "sidecar.sock"
        data: dict[str, Any] = {"appkey": srv.appkey, "log_format": "json", "log_level": "info",
                                "upstream": {"urls": [srv.data_url], "ca": str(srv.ca), "pkcs12": str(p12),
                                             "pkcs12_password_file": str(pw)},
                                "listen": {"socket": str(sock)}}
        for k, v in settings.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
        path = tmp / "sidecar.toml"
        write_toml(path, data)
        return cls(tmp, path, sock, clean_env(), password)

    async def start(self, timeout: float = 30) -> "SidecarProcess":
        self.starts += 1
        log = self.tmp / f"sidecar-{self.starts}.log"
        self.log_paths.append(log)
        self.proc = spawn([str(SKM), "sidecar", "--config", str(self.config_path)], log, self.env, self.tmp)
        await wait_for_log(self.proc, log, _SIDECAR_SERVING, "skm sidecar", timeout)
        return self


    def session(self, **kw: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession("http://sidecar", connector=aiohttp.UnixConnector(path=str(self.socket),
                                                                                      limit=kw.pop("limit", 100)),
                                     timeout=aiohttp.ClientTimeout(total=kw.pop("total", 30)), **kw)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())
