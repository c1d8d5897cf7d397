"""The key server's configuration (see server/config.py for the loader)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RootKeyConfig:
    provider: str = "file"            # file | pkcs11
    path: str = ""                    # file provider; default <data_dir>/root.key
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "skm"
    key_label: str = "skm-root"
    pin_env: str = "SKM_PKCS11_PIN"
    pin_file: str = ""


@dataclass(frozen=True)
class SystemKeySourceConfig:
    source: str = "local"             # local | remote
    path: str = ""                    # local: wrapped keyring file; default <data_dir>/systemkey.json
    urls: tuple[str, ...] = ()        # remote: https://host:port of system-key servers
    client_cert: str = ""             # remote: key server's client certificate
    client_key: str = ""
    ca: str = ""
    retry_initial: float = 0.2
    retry_max: float = 5.0
    timeout: float = 5.0


@dataclass(frozen=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    cert: str = ""                    # default <data_dir>/pki/server.pem
    key: str = ""
    client_ca: str = ""               # data plane: CA of client certificates


@dataclass(frozen=True)
class ServerConfig:
    data_dir: str = ".skm"
    storage: str = ""                 # "" = sqlite in data_dir; "sqlite:///path" | "postgresql://..."
    data: ListenerConfig = field(default_factory=lambda: ListenerConfig(port=8443))
    mgmt: ListenerConfig = field(default_factory=lambda: ListenerConfig(port=8444))
    rootkey: RootKeyConfig = field(default_factory=RootKeyConfig)
    systemkey: SystemKeySourceConfig = field(default_factory=SystemKeySourceConfig)
    min_auto_rotation_days: int = 30
    deletion_grace_days: int = 7
    purge_interval: float = 60.0
    max_body_bytes: int = 256 * 1024
    trusted_proxies: tuple[str, ...] = ()
    log_format: str = "auto"          # auto | json | console
    log_level: str = "info"
    public_url: str = ""              # how clients reach the data plane, for messages only

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.data_path / 'skm.db'}"

    def root_key_path(self) -> Path:
        return Path(self.rootkey.path) if self.rootkey.path else self.data_path / "root.key"

    def system_key_path(self) -> Path:
        return Path(self.systemkey.path) if self.systemkey.path else self.data_path / "systemkey.json"

    def pki_dir(self) -> Path:
        return self.data_path / "pki"

    def listener_files(self, which: str) -> tuple[Path, Path, Path]:
        lc: ListenerConfig = getattr(self, which)
        pki = self.pki_dir()
        cert = Path(lc.cert) if lc.cert else pki / "server.pem"
        key = Path(lc.key) if lc.key else pki / "server-key.pem"
        ca = Path(lc.client_ca) if lc.client_ca else pki / "ca.pem"
        return cert, key, ca
