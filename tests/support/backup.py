"""An installation laid out the way docs/disaster-recovery.md says to keep it, for backup tests.

The root key, the wrapped keyring and the TLS files live in `<tmp>/keys` (kept apart from the
data); the data dir (SQLite) or the database (PostgreSQL) is what a disaster destroys. `skm`
commands run as real processes (`run_skm`).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from server.access.pki import DevPKI
from server.app import KeyServer
from server.config import load
from server.init import InitResult, init_server
from server.settings import ServerConfig
from tests.support.server import Harness

__all__ = ["Installation", "make_installation", "run_skm", "REPO"]

REPO = Path(__file__).resolve().parents[2]


def _toml(tmp: Path, storage: str, extra: str) -> str:
    keys = tmp / "keys"
    pki = keys / "pki"
    return f'''data_dir = "{tmp / 'data'}"
storage = "{storage}"
purge_interval = 3600.0
log_format = "json"
log_level = "warning"
{extra}
[rootkey]
path = "{keys / 'root.key'}"
[systemkey]
path = "{keys / 'systemkey.json'}"
[data]
port = 0
cert = "{pki / 'server.pem'}"
key = "{pki / 'server-key.pem'}"
client_ca = "{pki / 'ca.pem'}"
[mgmt]
port = 0
cert = "{pki / 'server.pem'}"
key = "{pki / 'server-key.pem'}"
'''


class KeptHarness(Harness):
    """The test harness with its TLS files where this layout keeps them."""

    @property
    def pki(self) -> DevPKI:
        return DevPKI(self.tmp / "keys" / "pki")


@dataclass
class Installation:
    tmp: Path
    config_path: Path
    init: InitResult

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def ca(self) -> Path:
        return self.keys / "pki" / "ca.pem"

    def config(self, **overrides) -> ServerConfig:
        return load(ServerConfig, self.config_path, env={}, overrides=overrides or None)

    def set_storage(self, storage: str) -> None:
        """Point the config at another database (a restore target)."""
        text = self.config_path.read_text().splitlines()
        text = [f'storage = "{storage}"' if ln.startswith("storage = ") else ln for ln in text]
        self.config_path.write_text("\n".join(text) + "\n")

    async def start(self) -> Harness:
        server = await KeyServer(self.config()).start()
        return KeptHarness(server, self.init, self.tmp)

    def env(self, h: Harness | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_")}
        env.update(PYTHONPATH=str(REPO), SKM_LOG_LEVEL="warning", SKM_CONFIG=str(self.tmp / "no-cli-config.toml"))
        if h is not None:
            env.update(SKM_ADDR=h.mgmt_url, SKM_TOKEN=self.init.token, SKM_CACERT=str(self.ca))
        return env


async def make_installation(tmp: Path, storage: str = "", extra: str = "") -> Installation:
    """`skm server init`'s work, with the keys and TLS files moved out of the data dir."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "keys").mkdir(mode=0o700)
    cfg_path = tmp / "server.toml"
    cfg_path.write_text(_toml(tmp, storage, extra))
    cfg = load(ServerConfig, cfg_path, env={})
    result = await init_server(cfg)
    shutil.move(str(cfg.data_path / "pki"), str(tmp / "keys" / "pki"))
    return Installation(tmp, cfg_path, result)


async def run_skm(*args: str, env: dict[str, str], timeout: float = 300) -> tuple[int, str, str]:
    """`skm ARGS` as its own process; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "server.cli.main", *args, env=env,
                                                cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()
