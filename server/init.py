"""`skm server init`: everything a fresh key server needs, in its data dir.

Creates the root key (file provider, 0600) unless an HSM holds it, the wrapped
system-key keyring, the dev PKI (CA, server certificate), the first project
with its appkey, and a bootstrap admin operator whose token is printed once and
stored only as a digest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from server.access.operators import Operators
from server.access.pki import DevPKI
from server.barrier.barrier import Barrier
from server.barrier.keyring import new_keyring, save_keyring_file
from server.barrier.providers import make_provider
from server.barrier.rootkey import FileRootKey
from server.errors import ConfigError
from server.keys.service import KeyService
from server.settings import ServerConfig
from server.storage.factory import open_storage


@dataclass
class InitResult:
    appkey: str
    operator: str
    token: str = field(repr=False)     # shown once; never in a repr, log or traceback
    data_dir: Path
    ca_cert: Path


async def init_server(cfg: ServerConfig, *, project: str = "default", operator: str = "admin",
                      hostnames: list[str] | None = None) -> InitResult:
    data = cfg.data_path
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    if cfg.system_key_path().exists() and cfg.systemkey.source == "local":
        raise ConfigError(f"{data} is already initialised (found {cfg.system_key_path()}); "
                          "use another --data-dir or remove it")
    if cfg.rootkey.provider == "file" and not cfg.root_key_path().exists():
        root = FileRootKey.create(cfg.root_key_path())
    else:
        root = make_provider(cfg.rootkey, cfg.root_key_path())
    ring = await new_keyring(root)
    save_keyring_file(cfg.system_key_path(), ring)
    pki = DevPKI(cfg.pki_dir())
    if not pki.exists():
        pki.create(hostnames)
    barrier = Barrier()
    barrier.unseal(await ring.unwrap_all(root), ring.current)
    await root.close()
    storage = open_storage(cfg.storage_url())
    await storage.open()
    try:
        keys = KeyService(storage, barrier)
        proj = await keys.create_project(project)
        ops = Operators(storage)
        op = await ops.create(operator, "admin")
        token = await ops.issue_token(op, "bootstrap token from skm server init")
    finally:
        await storage.close()
    return InitResult(proj.appkey, operator, token, data, pki.ca_cert)
