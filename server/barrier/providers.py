"""Build the configured root-key provider.

Here rather than in rootkey.py: the PKCS#11 provider builds on rootkey's base class, so the
one place that names every provider sits above both.
"""
from __future__ import annotations

from pathlib import Path

from server.barrier.rootkey import FileRootKey, RootKeyProvider
from server.errors import ConfigError
from server.settings import RootKeyConfig


def make_provider(cfg: RootKeyConfig, default_path: Path) -> RootKeyProvider:
    if cfg.provider == "file":
        return FileRootKey(Path(cfg.path) if cfg.path else default_path)
    if cfg.provider == "pkcs11":
        from server.barrier.pkcs11 import PKCS11RootKey     # python-pkcs11 only for an HSM (offline tools start faster)
        return PKCS11RootKey.from_config(cfg)
    raise ConfigError(f"rootkey.provider must be 'file' or 'pkcs11', not {cfg.provider!r}")
