"""A key server process that gets its system key from a system-key server process (mTLS)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from server.barrier.keyring import load_keyring_file
from server.config import load
from server.systemkey import admin
from server.systemkey.settings import SystemKeyServerConfig
from tests.reliability.procs import ServerProcess, SystemKeyProcess, clean_env, write_toml
from tests.support.pki import TestPKI, make_pki
from tests.support.postgres import free_port


@dataclass
class SystemKeyEnv:
    server: ServerProcess
    systemkey: SystemKeyProcess
    pki: TestPKI
    port: int


@contextlib.asynccontextmanager
async def systemkey_env(tmp: Path, server_proc, *, env: dict[str, str] | None = None, start_systemkey: bool = True,
                        start_server: bool = True, retry_max: float = 0.5) -> AsyncIterator[SystemKeyEnv]:
    pki = make_pki(tmp / "sk-pki")
    port = free_port()
    srv = await server_proc("keyserver", env=env, systemkey={
        "source": "remote", "urls": [f"https://127.0.0.1:{port}"], "client_cert": str(pki.keyserver_cert),
        "client_key": str(pki.keyserver_key), "ca": str(pki.ca_pem), "retry_initial": 0.1,
        "retry_max": retry_max, "timeout": 2.0})
    # `skm server init` wrote the wrapped keyring locally; it moves to the system-key server.
    sk_dir = tmp / "systemkey"
    cfg_path = tmp / "systemkey.toml"
    write_toml(cfg_path, {"data_dir": str(sk_dir), "port": port, "cert": str(pki.systemkey_cert),
                          "key": str(pki.systemkey_key), "client_ca": str(pki.ca_pem), "log_format": "json"})
    cfg = load(SystemKeyServerConfig, cfg_path, env_prefix="SKM_SYSTEMKEY_", env={})
    admin.init(cfg, load_keyring_file(srv.config.system_key_path()))
    admin.allow(cfg, pki.keyserver_fp, "reliability key server")
    sk = SystemKeyProcess(tmp, cfg_path, port, clean_env(env))
    try:
        if start_systemkey:
            await sk.start()
        if start_server:
            await srv.start(wait_unsealed=False)
        yield SystemKeyEnv(srv, sk, pki, port)
    finally:
        await srv.stop()
        await sk.stop()
