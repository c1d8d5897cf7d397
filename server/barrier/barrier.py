"""The barrier: every sensitive stored record is sealed under the system key.

Blob = system-key version (uint32 big-endian) || 12-byte nonce || AES-256-GCM
ciphertext || tag, with AAD = the record's identity, so a blob copied into
another row or version does not open.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from server import logs
from server.errors import BarrierError, Sealed

log = logs.get("skm.barrier")

_HDR = struct.Struct(">I")


def record_aad(table: str, *identity: object) -> bytes:
    """AAD naming one record: table, primary key parts (the version among them)."""
    return "\x1f".join([table, *map(str, identity)]).encode()


def sealed_aad(table: str, column: str, *pk: object) -> bytes:
    """AAD of one sealed column of one row: a blob moved to another row *or column* does not open."""
    return record_aad(table, column, *pk)


# HKDF-Extract salt of the per-version derivation root: purpose keys never come from the AES key itself.
_DERIVE_SALT = b"skm barrier derive v1"


def _derivation_root(key: bytes) -> bytes:
    """HKDF-Extract(salt, system key): the pseudo-random key purpose keys are expanded from."""
    return hmac.new(_DERIVE_SALT, key, hashlib.sha256).digest()


class Barrier:
    def __init__(self) -> None:
        self._keys: dict[int, AESGCM] = {}
        # Per version: HKDF-Extract of the system key, so derive() needs no raw system-key bytes kept here.
        self._roots: dict[int, bytes] = {}
        self.current_version: int | None = None
        self.sealed_reason: str = "starting: the system key has not been fetched yet"
        self.on_change: list[Callable[[], None]] = []     # told after it opens or seals (/metrics)

    @property
    def sealed(self) -> bool:
        return self.current_version is None

    def unseal(self, system_keys: dict[int, bytes], current: int) -> None:
        if current not in system_keys:
            raise ValueError("current system-key version is missing from the keyring")
        self._keys = {v: AESGCM(k) for v, k in system_keys.items()}
        self._roots = {v: _derivation_root(k) for v, k in system_keys.items()}
        self.current_version = current
        self._changed()

    def add_version(self, version: int, key: bytes, make_current: bool = True) -> None:
        self._keys[version] = AESGCM(key)
        self._roots[version] = _derivation_root(key)
        if make_current:
            self.current_version = version
        self._changed()

    def retire(self, version: int) -> None:
        if version == self.current_version:
            raise ValueError("cannot retire the current system-key version")
        self._keys.pop(version, None)
        self._roots.pop(version, None)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def seal_now(self, reason: str) -> None:
        self._keys.clear()
        self._roots.clear()
        self.current_version = None
        self.sealed_reason = reason
        self._changed()

    def _changed(self) -> None:
        # Observers (metrics, the checkpointer) only watch: one that fails must not make an unseal that
        # happened look failed to its caller.
        for tell in self.on_change:
            try:
                tell()
            except Exception as e:      # noqa: BLE001
                log.warning("barrier_observer_failed", error_type=type(e).__name__)

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

    def derive(self, purpose: bytes, version: int | None = None, length: int = 32) -> tuple[int, bytes]:
        """A purpose key: HKDF-SHA256(system key `version`, info=`purpose`); returns (version, key).

        `version` None means the current one. Distinct purposes give independent keys; the
        system key itself never leaves the barrier. A key derived from a version verifies
        only while that version is in the keyring (not retired)."""
        self._require_open()
        v = self.current_version if version is None else version
        root = self._roots.get(v)
        if root is None:
            raise BarrierError(f"system-key version {v} is not in this server's keyring (retired, or another "
                               "installation's)")
        return v, HKDFExpand(hashes.SHA256(), length, purpose).derive(root)

    @staticmethod
    def version_of(blob: bytes) -> int:
        return _HDR.unpack_from(blob)[0]
