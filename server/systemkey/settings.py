"""The system-key server's configuration (loaded by server/config.py, prefix SKM_SYSTEMKEY_)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server import config as config_loader

ENV_PREFIX = "SKM_SYSTEMKEY_"


@dataclass(frozen=True)
class SystemKeyServerConfig:
    data_dir: str = ".skm-systemkey"
    host: str = "127.0.0.1"
    port: int = 8445
    cert: str = ""                    # default <data_dir>/pki/systemkey.pem
    key: str = ""                     # default <data_dir>/pki/systemkey-key.pem
    client_ca: str = ""               # CA of key-server client certificates; default <data_dir>/pki/ca.pem
    allow_list: str = ""              # default <data_dir>/allowed.txt
    audit_log: str = ""               # default <data_dir>/audit.jsonl
    handshake_timeout: float = 10.0   # a connection must finish its TLS handshake within this
    log_format: str = "auto"          # auto | json | console
    log_level: str = "info"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def keyring_path(self) -> Path:
        return self.data_path / "keyring.json"

    def allow_list_path(self) -> Path:
        return Path(self.allow_list) if self.allow_list else self.data_path / "allowed.txt"

    def audit_log_path(self) -> Path:
        return Path(self.audit_log) if self.audit_log else self.data_path / "audit.jsonl"

    def tls_files(self) -> tuple[Path, Path, Path]:
        pki = self.data_path / "pki"
        return (Path(self.cert) if self.cert else pki / "systemkey.pem",
                Path(self.key) if self.key else pki / "systemkey-key.pem",
                Path(self.client_ca) if self.client_ca else pki / "ca.pem")


def load(path: str | os.PathLike | None = None, **overrides) -> SystemKeyServerConfig:
    return config_loader.load(SystemKeyServerConfig, path, env_prefix=ENV_PREFIX, overrides=overrides or None)
