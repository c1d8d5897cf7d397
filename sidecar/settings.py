"""The sidecar's configuration: one TOML file, every value also from `SKM_SIDECAR_*`.

    appkey = "CuKPvJQR7enquqrZ"
    [upstream]
    urls = ["https://keys-1.internal:8443", "https://keys-2.internal:8443"]
    ca = "/etc/skm/ca.pem"
    cert = "/etc/skm/host.pem"          # or pkcs12 + pkcs12_password_file
    key = "/etc/skm/host-key.pem"
    [listen]
    socket = "/run/skm/sidecar.sock"
    socket_group = "apps"
    (top level) access = ["key:<keyid> uid:1000 gid:50", "keystore:<id> uid:1001"]
    [[render]]                          # files rendered from templates: see sidecar/render_config.py
    template = "{{ secret('payments/db-password') }}"
    destination = "/run/app/db-password"
"""
from __future__ import annotations

import grp
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from server.config import load
from server.errors import ConfigError
from sidecar.render_config import RenderConfig, validate_blocks

ENV_PREFIX = "SKM_SIDECAR_"
VERSIONS = ("v1.0", "v1.1", "v1.2", "v1.3")


@dataclass(frozen=True)
class UpstreamConfig:
    urls: tuple[str, ...] = ("https://127.0.0.1:8443",)
    ca: str = ""                          # CA that signed the key server's certificate
    cert: str = ""                        # host certificate (PEM) ...
    key: str = ""                         # ... and its private key (PEM, 0600)
    pkcs12: str = ""                      # or a PKCS#12 bundle ...
    pkcs12_password_file: str = ""        # ... with its password in a file
    api_version: str = "v1.0"             # used for app paths given without the /keymanager prefix
    user_access_key_id: str = ""          # v1.2 caller credentials (the sidecar's own)
    user_access_key_secret_file: str = ""
    token_file: str = ""                  # v1.3 bearer token (the sidecar's own)
    connect_timeout: float = 3.0
    request_timeout: float = 10.0
    retries: int = 2                      # extra attempts, idempotent reads only
    pool_size: int = 32
    unhealthy_for: float = 5.0            # seconds a failed upstream is passed over


@dataclass(frozen=True)
class ListenConfig:
    socket: str = "/run/skm/sidecar.sock"
    socket_group: str = ""                # group name or gid owning the socket (mode 0660)
    tcp_port: int = -1                    # -1 off, 0 any free port; always 127.0.0.1 only
    # Any local user can connect to 127.0.0.1 (no socket file mode to limit who): with
    # access_default = "allow" every one of them could read every key no rule names. A TCP listener
    # starts with that only when the operator says so here.
    tcp_allow_default: bool = False
    max_body_bytes: int = 256 * 1024
    fast_path: bool = True                # cached reads answered without aiohttp's pipeline (sidecar/fastpath.py)


@dataclass(frozen=True)
class CacheConfig:
    ttl: float = 30.0
    max_entries: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    stale_if_error: float = 300.0         # how old a cached value may be when served during an outage


@dataclass(frozen=True)
class EventsConfig:
    enabled: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    read_timeout: float = 45.0            # no byte (not even a heartbeat) for this long: reconnect


@dataclass(frozen=True)
class AttestConfig:
    interface: str = ""                   # "" = the interface that routes to the first upstream
    recheck: float = 5.0                  # seconds between MAC re-reads


@dataclass(frozen=True)
class ReadsConfig:
    """[reads]: a record of every local read, shipped to the key server's audit (sidecar/reads.py)."""
    enabled: bool = True
    spool: str = ""                       # on-disk buffer while the key server is away; "" = <socket>.reads-spool
                                          # beside listen.socket (choose a persistent dir to survive reboots)
    spool_max_records: int = 100_000      # beyond: counted as dropped and reported to the server
    flush_interval: float = 1.0           # seconds between shipments
    batch_max: int = 500                  # records per request (the server takes up to 1000)
    detail_max: int = 2000                # reads per interval recorded one by one; beyond, identical reads
                                          # (caller, key, version, source) become one record with a count

    def spool_path(self, cfg: "SidecarConfig") -> str:
        return self.spool or str(Path(cfg.listen.socket).with_suffix(".reads-spool"))


@dataclass(frozen=True)
class AcksConfig:
    """[acks]: acknowledge the key versions this host holds (the key server's roll-out view)."""
    enabled: bool = True
    ttl: float = 120.0                    # the server marks this host stale after this long without a report;
                                          # a heartbeat goes every ttl/3


@dataclass(frozen=True)
class SidecarConfig:
    appkey: str = ""
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    attest: AttestConfig = field(default_factory=AttestConfig)
    reads: ReadsConfig = field(default_factory=ReadsConfig)
    acks: AcksConfig = field(default_factory=AcksConfig)
    access: tuple[str, ...] = ()          # allow-list rules, see AccessRule.parse
    access_default: str = "allow"         # keys no rule names: allow | deny
    reject_app_credentials: bool = False  # refuse (instead of strip) requests carrying credentials
    render: tuple[RenderConfig, ...] = ()  # [[render]] blocks: templates rendered to files (config file only)
    log_format: str = "auto"
    log_level: str = "info"

    def validate(self) -> "SidecarConfig":
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.appkey):
            raise ConfigError("appkey must be set (the project's appkey, letters and digits)")
        if not self.upstream.urls or not all(u.startswith("https://") for u in self.upstream.urls):
            raise ConfigError("upstream.urls must list https:// key-server URLs")
        if self.upstream.api_version not in VERSIONS:
            raise ConfigError(f"upstream.api_version must be one of {', '.join(VERSIONS)}")
        if bool(self.upstream.cert) == bool(self.upstream.pkcs12):
            raise ConfigError("give the host certificate as upstream.cert + upstream.key or as upstream.pkcs12")
        if self.upstream.cert and not self.upstream.key:
            raise ConfigError("upstream.key (the host certificate's private key) is missing")
        if self.access_default not in ("allow", "deny"):
            raise ConfigError("access_default must be allow or deny")
        if self.listen.tcp_port >= 0 and self.access_default == "allow" and not self.listen.tcp_allow_default:
            raise ConfigError("listen.tcp_port with access_default = \"allow\" lets every local user read every key "
                              "no access rule names over TCP: set access_default = \"deny\" with access rules, "
                              "or listen.tcp_allow_default = true to accept that")
        if self.cache.ttl <= 0 or self.cache.max_entries <= 0 or self.cache.max_bytes <= 0:
            raise ConfigError("cache.ttl, cache.max_entries and cache.max_bytes must be positive")
        if self.upstream.retries < 0 or self.upstream.retries > 10:
            raise ConfigError("upstream.retries must be 0..10")
        r = self.reads
        if r.flush_interval <= 0 or not 1 <= r.batch_max <= 1000 or r.spool_max_records < 0 or r.detail_max < 0:
            raise ConfigError("reads: flush_interval must be positive, batch_max 1..1000, spool_max_records and "
                              "detail_max not negative")
        if not 2 <= self.acks.ttl <= 86_400:
            raise ConfigError("acks.ttl must be 2..86400 seconds")
        self.rules()           # parse errors surface at start
        self.socket_gid()
        validate_blocks(self.render)
        return self

    def rules(self) -> list["AccessRule"]:
        return [AccessRule.parse(r) for r in self.access]

    def socket_gid(self) -> int | None:
        g = self.listen.socket_group
        if not g:
            return None
        if g.isdigit():
            return int(g)
        try:
            return grp.getgrnam(g).gr_gid
        except KeyError:
            raise ConfigError(f"listen.socket_group {g!r} is not a group on this host") from None


@dataclass(frozen=True)
class AccessRule:
    """`key:<32 hex> uid:1000 gid:50 ...` or `keystore:<id> uid:...`: who may use that key / store."""
    kind: str                  # key | keystore
    target: str
    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> "AccessRule":
        parts = text.split()
        if not parts or ":" not in parts[0]:
            raise ConfigError(f"access rule {text!r}: start with key:<keyid> or keystore:<id>")
        kind, target = parts[0].split(":", 1)
        if kind == "key" and not re.fullmatch(r"[0-9a-f]{32}", target):
            raise ConfigError(f"access rule {text!r}: a key id is 32 lowercase hex characters")
        if kind == "keystore" and not target.isdigit():
            raise ConfigError(f"access rule {text!r}: a key store is named by its numeric id")
        if kind not in ("key", "keystore"):
            raise ConfigError(f"access rule {text!r}: start with key:<keyid> or keystore:<id>")
        uids, gids = set(), set()
        for p in parts[1:]:
            who, _, num = p.partition(":")
            if who not in ("uid", "gid") or not num.isdigit():
                raise ConfigError(f"access rule {text!r}: list callers as uid:N or gid:N")
            (uids if who == "uid" else gids).add(int(num))
        if not uids and not gids:
            raise ConfigError(f"access rule {text!r}: name at least one uid:N or gid:N")
        return cls(kind, target, frozenset(uids), frozenset(gids))


def load_config(path: str | os.PathLike | None, env=None, overrides=None) -> SidecarConfig:
    return load(SidecarConfig, path, env_prefix=ENV_PREFIX, env=env, overrides=overrides).validate()


def read_secret_file(path: str, what: str) -> str:
    """A credential kept in a file; one readable by others is refused."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError:
        raise ConfigError(f"{what} file {p} cannot be read") from None
    if st.st_mode & 0o007:
        raise ConfigError(f"{what} file {p} is readable by others; chmod 600 it")
    if not text:
        raise ConfigError(f"{what} file {p} is empty")
    return text
