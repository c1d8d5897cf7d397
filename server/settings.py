"""The key server's configuration (see server/config.py for the loader).

Each nested dataclass is a TOML table whose env names join the path:
``[login] max_failures`` is ``SKM_LOGIN_MAX_FAILURES``, ``[audit] enabled`` is
``SKM_AUDIT_ENABLED``, ``[approvals] webhook_url`` is ``SKM_APPROVALS_WEBHOOK_URL``,
``[console] idle_seconds`` is ``SKM_CONSOLE_IDLE_SECONDS``, ``[compat] inventory_appkey_only`` is
``SKM_COMPAT_INVENTORY_APPKEY_ONLY``, ``[backup] dir`` is ``SKM_BACKUP_DIR``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server.config import build

_S = TypeVar("_S")


def _from_config(cls: type[_S], config: Any, attr: str, env_prefix: str) -> _S:
    """`config.<attr>` when the config carries it, else built from the environment alone."""
    found = getattr(config, attr, None)
    if isinstance(found, cls):
        return found
    return build(cls, {}, os.environ, env_prefix)


@dataclass(frozen=True)
class LoginSettings:
    """Operator login policy: [login] / SKM_LOGIN_*."""
    max_failures: int = 5             # failed logins in a row from one address before the name is locked there
    lockout_seconds: int = 900
    max_failures_per_name: int = 100  # failures from all addresses within lockout_seconds: past it, only
                                      # addresses the operator logged in from before are accepted
    rate_per_minute: int = 30         # login attempts per client IP per minute
    token_ttl_hours: float = 12.0     # lifetime of a token issued by login
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4

    @classmethod
    def from_config(cls, config) -> "LoginSettings":
        return _from_config(cls, config, "login", "SKM_LOGIN_")


@dataclass(frozen=True)
class AuditSettings:
    """The audit log: [audit] / SKM_AUDIT_*."""
    enabled: bool = True
    fail_closed: bool = True          # a request whose record cannot be written fails with 503
    batch_max: int = 256              # records committed in one transaction, at most
    # Signed checkpoints of the chain's head, kept where the database's owner cannot rewrite them
    # (docs/audit.md): every `checkpoint_every` records or `checkpoint_interval` seconds.
    checkpoint_every: int = 1000
    checkpoint_interval: float = 60.0
    checkpoint_file: str = ""         # JSON lines, appended; meant to live outside the data dir
    checkpoint_url: str = ""          # webhook: a JSON POST per checkpoint
    checkpoint_url_ca: str = ""       # CA file for an https webhook with a private CA
    checkpoint_systemkey: bool = True  # also send them to the system-key server(s) when one is configured

    @classmethod
    def from_config(cls, config) -> "AuditSettings":
        return _from_config(cls, config, "audit", "SKM_AUDIT_")


@dataclass(frozen=True)
class ApprovalSettings:
    """The approval workflow: [approvals] / SKM_APPROVALS_*."""
    expiry_days: float = 7.0
    webhook_url: str = ""             # approvers' webhook: JSON POST on every new change request
    webhook_ca: str = ""              # CA file for an https webhook with a private CA
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    expire_interval: float = 60.0     # how often pending requests past their expiry are marked EXPIRED
    operators: bool = False           # operator management (create, grant, password reset, credentials for
                                      # someone else) becomes a change request another global admin approves
    operators_needed: int = 1         # approvals an operator management request needs

    @classmethod
    def from_config(cls, config) -> "ApprovalSettings":
        return _from_config(cls, config, "approvals", "SKM_APPROVALS_")


@dataclass(frozen=True)
class CompatSettings:
    """Where this server is stricter than NHN's, the switch back: [compat] / SKM_COMPAT_*."""
    # The v1.0+ inventory (GET /keystores...) lists a store's keys, IPs, MACs and certificate names.
    # false (default): only to a caller that passes that store's own checks; true: to anyone holding
    # the appkey, as NHN's does.
    inventory_appkey_only: bool = False


@dataclass(frozen=True)
class BackupSettings:
    """Scheduled backups: [backup] / SKM_BACKUP_* (server/backup/schedule.py)."""
    dir: str = ""                     # where scheduled backups go; "" = none scheduled
    interval: float = 86400.0         # seconds between backups
    keep: int = 7                     # newest backups kept in `dir`; older ones are deleted

    @classmethod
    def from_config(cls, config) -> "BackupSettings":
        return _from_config(cls, config, "backup", "SKM_BACKUP_")


@dataclass(frozen=True)
class ConsoleSettings:
    """The web console: [console] / SKM_CONSOLE_*. Here, not in server/console/, because ServerConfig
    carries it and the console imports the runtime, which imports this module."""
    idle_seconds: float = 900.0       # a session unused this long ends (its token is revoked)

    @classmethod
    def from_config(cls, config) -> "ConsoleSettings":
        return _from_config(cls, config, "console", "SKM_CONSOLE_")


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
    material_cache_entries: int = 4096   # loaded key versions kept in memory (parsed RSA keys are costly)
    deletion_grace_days: int = 7
    purge_interval: float = 60.0
    workers: int = 1                  # data-plane processes on one port (SO_REUSEPORT); see server/workers.py
    event_loop: str = "auto"          # auto (uvloop when installed) | uvloop | asyncio; see server/loops.py
    max_body_bytes: int = 256 * 1024
    header_timeout: float = 10.0      # a connection must finish a request's headers within this (slow-loris)
    handshake_timeout: float = 10.0   # ... and its TLS handshake within this, from the TCP connect
    keepalive_timeout: float = 75.0
    body_timeout: float = 10.0
    trusted_proxies: tuple[str, ...] = ()
    log_format: str = "auto"          # auto | json | console
    log_level: str = "info"
    public_url: str = ""              # how clients reach the data plane (a proxy in front): shown as the
                                      # data-plane URL by the API, CLI and console; "" = the data listener
    hsts_max_age: int = 31536000      # Strict-Transport-Security on the management listener (console); 0: none
    login: LoginSettings = field(default_factory=LoginSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)
    compat: CompatSettings = field(default_factory=CompatSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.data_path / 'skm.db'}"

    def systemkey_client(self) -> SystemKeySourceConfig:
        """[systemkey] with the key server's own TLS identity and dev CA as the mTLS defaults."""
        import dataclasses
        pki, sk = self.pki_dir(), self.systemkey
        return dataclasses.replace(sk, client_cert=sk.client_cert or str(pki / "server.pem"),
                                   client_key=sk.client_key or str(pki / "server-key.pem"),
                                   ca=sk.ca or str(pki / "ca.pem"))

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
