"""Root-key providers: they wrap and unwrap system keys and never release the root key.

The wrap format is the same for every provider: 12-byte nonce || AES-256-GCM
ciphertext || tag, AAD = b"skm/system-key/v<version>", so a keyring can move
between a file root key and an HSM root key by re-wrapping only.
"""
from __future__ import annotations

import abc
import asyncio
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import ConfigError

ROOT_KEY_BYTES = 32


class WrongRootKey(ConfigError):
    message = "Wrong Root Key"


def wrap_aad(version: int) -> bytes:
    return f"skm/system-key/v{version}".encode()


class RootKeyProvider(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    async def wrap(self, system_key: bytes, version: int) -> bytes: ...

    @abc.abstractmethod
    async def unwrap(self, wrapped: bytes, version: int) -> bytes:
        """Raise WrongRootKey when the blob was not wrapped by this root key."""

    async def close(self) -> None:
        return None


def write_private_file(path: Path, data: bytes) -> None:
    """Write a new 0600 file; refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_private_file(path: Path, what: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; run `skm server init` first") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} {path} is readable by group or others; run `chmod 600 {path}`")
    return path.read_bytes()


class FileRootKey(RootKeyProvider):
    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        raw = read_private_file(self.path, "root key file")
        if len(raw) != ROOT_KEY_BYTES:
            raise ConfigError(f"root key file {self.path} must hold exactly {ROOT_KEY_BYTES} bytes")
        self._aead = AESGCM(raw)

    @classmethod
    def create(cls, path: Path) -> "FileRootKey":
        write_private_file(Path(path), os.urandom(ROOT_KEY_BYTES))
        return cls(path)

    async def wrap(self, system_key: bytes, version: int) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, system_key, wrap_aad(version))

    async def unwrap(self, wrapped: bytes, version: int) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], wrap_aad(version))
        except (InvalidTag, ValueError):
            raise WrongRootKey(
                f"the root key in {self.path} does not unwrap system-key version {version}; "
                "is this the root key this server was initialised with?") from None


async def to_thread(fn, *args):
    # PKCS#11 calls block; keep them off the event loop.
    return await asyncio.to_thread(fn, *args)
