"""The wrapped system-key keyring and where a key server gets it from.

A keyring holds every system-key version, each wrapped by the root key, and
which version is current. The local source is a JSON file beside the data (dev
default); the remote source is the system-key server over mTLS.
"""
from __future__ import annotations

import abc
import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.barrier.rootkey import RootKeyProvider
from server.errors import ConfigError


@dataclass
class WrappedKeyring:
    current: int
    versions: dict[int, bytes] = field(default_factory=dict)
    retired: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {
            "current": self.current,
            "versions": {str(v): base64.b64encode(b).decode() for v, b in sorted(self.versions.items())},
            "retired": list(self.retired),
        }

    @classmethod
    def from_json(cls, data: dict) -> "WrappedKeyring":
        try:
            return cls(
                current=int(data["current"]),
                versions={int(v): base64.b64decode(b, validate=True) for v, b in data["versions"].items()},
                retired=tuple(int(v) for v in data.get("retired", ())),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ConfigError("the system-key keyring is malformed") from None

    async def unwrap_all(self, root: RootKeyProvider) -> dict[int, bytes]:
        return {v: await root.unwrap(b, v) for v, b in self.versions.items() if v not in self.retired}


async def new_keyring(root: RootKeyProvider) -> WrappedKeyring:
    return WrappedKeyring(current=1, versions={1: await root.wrap(os.urandom(32), 1)})


async def add_version(ring: WrappedKeyring, root: RootKeyProvider) -> int:
    v = max(ring.versions) + 1
    ring.versions[v] = await root.wrap(os.urandom(32), v)
    ring.current = v
    return v


async def rewrap(ring: WrappedKeyring, old: RootKeyProvider, new: RootKeyProvider) -> WrappedKeyring:
    """Root-key rotation: the same system keys, wrapped by another root key."""
    out = WrappedKeyring(current=ring.current, retired=ring.retired)
    for v, blob in ring.versions.items():
        out.versions[v] = await new.wrap(await old.unwrap(blob, v), v)
    return out


def save_keyring_file(path: Path, ring: WrappedKeyring) -> None:
    """Atomic replace, 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ring.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_keyring_file(path: Path) -> WrappedKeyring:
    try:
        return WrappedKeyring.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ConfigError(f"system-key keyring {path} does not exist; run `skm server init` first") from None
    except json.JSONDecodeError:
        raise ConfigError(f"system-key keyring {path} is not valid JSON") from None


class SystemKeySource(abc.ABC):
    description: str = "system-key source"

    @abc.abstractmethod
    async def fetch(self) -> WrappedKeyring: ...

    async def close(self) -> None:
        return None


class LocalKeyringSource(SystemKeySource):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"local keyring {self.path}"

    async def fetch(self) -> WrappedKeyring:
        return load_keyring_file(self.path)
