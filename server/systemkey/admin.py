"""Local admin commands of the system-key server (the CLI wires them into `skm systemkey ...`).

None of these is reachable over the network. The system-key server never holds
the root key: `init` imports a keyring the key server's init wrapped, and the
operator who holds the root key runs `rotate` / `rotate_root` on this host.
"""
from __future__ import annotations

from pathlib import Path

from server.barrier import keyring as kr
from server.barrier.keyring import WrappedKeyring
from server.barrier.rootkey import RootKeyProvider
from server.errors import ConfigError
from server.systemkey.settings import SystemKeyServerConfig
from server.systemkey.state import SystemKeyState, cert_file_fingerprint, normalize_fingerprint


def init(config: SystemKeyServerConfig, wrapped_keyring: WrappedKeyring) -> Path:
    """Create the state dir from a wrapped keyring; refuses an initialised dir. Returns the keyring path."""
    state = SystemKeyState(config)
    state.create(wrapped_keyring)
    return state.keyring_path


def init_from_file(config: SystemKeyServerConfig, keyring_file: str | Path) -> Path:
    """`skm systemkey init --keyring FILE`."""
    return init(config, kr.load_keyring_file(Path(keyring_file)))


def allow(config: SystemKeyServerConfig, fingerprint: str, note: str = "") -> bool:
    """Add a key-server certificate fingerprint (or a PEM file's); False if it was already there."""
    fp = cert_file_fingerprint(fingerprint) if Path(fingerprint).is_file() else normalize_fingerprint(fingerprint)
    return SystemKeyState(config).allow(fp, note)


def revoke(config: SystemKeyServerConfig, fingerprint: str) -> bool:
    """Remove a fingerprint; False if it was not there. Takes effect on the next fetch."""
    fp = cert_file_fingerprint(fingerprint) if Path(fingerprint).is_file() else normalize_fingerprint(fingerprint)
    return SystemKeyState(config).revoke(fp)


def allowed(config: SystemKeyServerConfig) -> list[tuple[str, str]]:
    return SystemKeyState(config).allow_entries()


async def _check_root(ring: WrappedKeyring, root: RootKeyProvider) -> None:
    # Every live version must open under this root key, or a rotation would mix root keys.
    for v, blob in ring.versions.items():
        if v not in ring.retired:
            await root.unwrap(blob, v)


async def rotate(config: SystemKeyServerConfig, root: RootKeyProvider) -> int:
    """Add a new system-key version wrapped by `root` and make it current; returns it.

    Raises WrongRootKey (and changes nothing) if `root` is not the keyring's root key.
    """
    state = SystemKeyState(config)
    ring = state.load_keyring()
    await _check_root(ring, root)
    version = await kr.add_version(ring, root)
    state.save_keyring(ring)
    return version


async def rotate_root(config: SystemKeyServerConfig, old: RootKeyProvider, new: RootKeyProvider) -> None:
    """Root-key rotation: re-wrap every version under `new`; user data is untouched."""
    state = SystemKeyState(config)
    ring = state.load_keyring()
    out = await kr.rewrap(ring, old, new)
    await _check_root(out, new)
    state.save_keyring(out)


def retire(config: SystemKeyServerConfig, version: int) -> None:
    """Mark a version retired (key servers stop unwrapping it). Run only once `skm barrier rewrap`
    shows no record on it; the wrapped blob is kept so a restored backup can still be re-enabled."""
    state = SystemKeyState(config)
    ring = state.load_keyring()
    if version not in ring.versions:
        raise ConfigError(f"system-key version {version} does not exist")
    if version == ring.current:
        raise ConfigError("cannot retire the current system-key version")
    if version not in ring.retired:
        ring.retired = tuple(sorted({*ring.retired, version}))
    state.save_keyring(ring)


def status(config: SystemKeyServerConfig) -> dict:
    """What `skm systemkey status` prints: versions, allow-list size, fetch count (no key material)."""
    state = SystemKeyState(config)
    ring = state.load_keyring()
    return {"data_dir": str(state.dir), "current": ring.current, "versions": sorted(ring.versions),
            "retired": list(ring.retired), "allowed": len(state.allowed()),
            "fetches": len(state.audit_records())}
