"""The barrier: every sensitive stored record is sealed under the system key.

Blob = system-key version (uint32 big-endian) || 12-byte nonce || AES-256-GCM
ciphertext || tag, with AAD = the record's identity, so a blob copied into
another row or version does not open.
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import BarrierError, Sealed

_HDR = struct.Struct(">I")


def record_aad(table: str, *identity: object) -> bytes:
    """AAD naming one record: table, primary key parts (the version among them)."""
    return "\x1f".join([table, *map(str, identity)]).encode()


def sealed_aad(table: str, column: str, *pk: object) -> bytes:
    """AAD of one sealed column of one row: a blob moved to another row *or column* does not open."""
    return record_aad(table, column, *pk)


class Barrier:
    def __init__(self) -> None:
        self._keys: dict[int, AESGCM] = {}
        self.current_version: int | None = None
        self.sealed_reason: str = "starting: the system key has not been fetched yet"

    @property
    def sealed(self) -> bool:
        return self.current_version is None

    def unseal(self, system_keys: dict[int, bytes], current: int) -> None:
        if current not in system_keys:
            raise ValueError("current system-key version is missing from the keyring")
        self._keys = {v: AESGCM(k) for v, k in system_keys.items()}
        self.current_version = current

    def add_version(self, version: int, key: bytes, make_current: bool = True) -> None:
        self._keys[version] = AESGCM(key)
        if make_current:
            self.current_version = version

    def retire(self, version: int) -> None:
        if version == self.current_version:
            raise ValueError("cannot retire the current system-key version")
        self._keys.pop(version, None)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def seal_now(self, reason: str) -> None:
        self._keys.clear()
        self.current_version = None
        self.sealed_reason = reason

    def _require_open(self) -> None:
        if self.current_version is None:
            raise Sealed(self.sealed_reason)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self._require_open()
        v = self.current_version
        nonce = os.urandom(12)
        return _HDR.pack(v) + nonce + self._keys[v].encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        self._require_open()
        if len(blob) < _HDR.size + 12 + 16:
            raise BarrierError("a sealed record is truncated")
        (v,) = _HDR.unpack_from(blob)
        key = self._keys.get(v)
        if key is None:
            raise BarrierError(f"a record is sealed under system-key version {v}, which this server does not hold")
        try:
            return key.decrypt(blob[4:16], blob[16:], aad)
        except InvalidTag:
            raise BarrierError("a sealed record failed its integrity check (tampered, moved, or a wrong system key)") from None

    @staticmethod
    def version_of(blob: bytes) -> int:
        return _HDR.unpack_from(blob)[0]
