"""Operations with a key's material: read a secret, encrypt/decrypt, sign/verify, data keys, export.

Each loads the version it needs once (unsealed and parsed) into the material cache; a version's
content never changes, and a disabled version is dropped from the cache on its event.
"""
from __future__ import annotations

import os
from typing import Any

from server.barrier.barrier import sealed_aad
from server.errors import (BarrierError, ExportNotAllowed, InvalidKeyVersion, InvalidKeyVersionStatus,
                           InvalidRequest, InvalidUserData)
from server.keys import checks, material
from server.keys.checks import require_active, require_type
from server.keys.context import KeyContext
from server.keys.formats import b64, unpack_ciphertext, unpack_signature
from server.keys.model import MAX_SECRET_BYTES, Key, KeyType


class Crypto:
    def __init__(self, ctx: KeyContext) -> None:
        self.ctx = ctx
        # Another process disabled a version: its event reaches us through the metadata cache.
        ctx.meta.on_version_disabled = self.forget_material

    async def version_raw(self, key: Key, version: int) -> bytes:
        row = await self.ctx.db.fetchone("SELECT key_id, version, status, material_sealed, seal FROM key_versions "
                                         "WHERE key_id = ? AND version = ?", key.id, version)
        if row is None:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        await self._require_sealed(row)
        if row["status"] == "DISABLED":
            raise InvalidKeyVersionStatus(f"key version {version} is disabled; an operator can re-enable it "
                                          f"(skm key version enable {key.id} {version})")
        if row["status"] != "ACTIVE":
            raise InvalidKeyVersionStatus(f"key version {version} is not in service")
        return self.ctx.barrier.open(bytes(row["material_sealed"]),
                                     sealed_aad("key_versions", "material_sealed", key.id, version))

    async def _require_sealed(self, row: dict) -> None:
        if not await self.ctx.seal.valid("key_versions", row):
            # Its status may be what was edited (a version disabled as compromised, switched back on).
            raise BarrierError(f"key version {row['version']} was changed outside the key server, so it cannot be "
                               "used; restore the database from a backup (docs/disaster-recovery.md)")

    async def loaded(self, key: Key, version: int):
        cache = self.ctx.material
        hit = cache.get((key.id, version))
        if hit is not None:
            return hit
        raw = await self.version_raw(key, version)
        if key.key_type is KeyType.SYMMETRIC_KEY:
            obj: Any = material.SymmetricVersion(key.id, version, raw)
        elif key.key_type is KeyType.ASYMMETRIC_KEY:
            obj = material.AsymmetricVersion(key.id, version, key.key_spec, raw)
        else:
            # A (key, version) never changes content: a rotation makes a new version, and the
            # key row (current_version, status) comes fresh from the event-invalidated cache.
            obj = bytearray(raw)
        cache.put((key.id, version), obj)
        return obj

    def forget_material(self, key_id: str) -> None:
        """Drop a key's loaded versions (a version was disabled: the next use re-reads its status)."""
        self.ctx.material.drop_key(key_id)
        self.ctx.meta.drop_key(key_id)

    async def secret_value(self, key: Key) -> str:
        require_type(key, KeyType.SECRET)
        require_active(key)
        return (await self.loaded(key, key.current_version)).decode("utf-8")

    async def encrypt(self, key: Key, plaintext: str) -> tuple[str, int]:
        require_type(key, KeyType.SYMMETRIC_KEY)
        require_active(key)
        data = checks.text_bytes(plaintext, "plaintext")
        v = await self.loaded(key, key.current_version)
        return v.encrypt(data), key.current_version

    async def decrypt(self, key: Key, ciphertext: str) -> tuple[str, int]:
        require_type(key, KeyType.SYMMETRIC_KEY)
        require_active(key)
        if len(ciphertext) > 2 * MAX_SECRET_BYTES:
            raise InvalidRequest("ciphertext is longer than any ciphertext this server makes")
        version, nonce, sealed = unpack_ciphertext(ciphertext)
        if version > key.current_version:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        v = await self.loaded(key, version)
        try:
            return v.decrypt(nonce, sealed).decode("utf-8"), version
        except UnicodeDecodeError:
            raise InvalidUserData("ciphertext does not hold text") from None

    async def create_local_key(self, key: Key) -> dict:
        require_type(key, KeyType.SYMMETRIC_KEY)
        require_active(key)
        plain = b64(os.urandom(32))
        v = await self.loaded(key, key.current_version)
        return {"localKeyPlaintext": plain, "localKeyCiphertext": v.encrypt(plain.encode("ascii")),
                "keyVersion": key.current_version}

    async def sign(self, key: Key, plaintext: str) -> tuple[str, int]:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        data = checks.text_bytes(plaintext, "plaintext", limit=material.LEGACY_SIGN_MAX)
        v = await self.loaded(key, key.current_version)
        return v.sign_legacy(data), key.current_version

    async def verify(self, key: Key, plaintext: str, signature: str) -> tuple[bool, int]:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        data = checks.text_bytes(plaintext, "plaintext", limit=material.LEGACY_SIGN_MAX)
        if len(signature) > 4096:
            raise InvalidRequest("signature is longer than any signature this server makes")
        version, sig = unpack_signature(signature)
        if version > key.current_version:
            return False, version
        v = await self.loaded(key, version)
        return v.verify_legacy(data, sig), version

    async def sign_standard(self, key: Key, data: bytes, algorithm: str | None) -> dict:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        checks.limit(data, material.STANDARD_SIGN_MAX)
        v = await self.loaded(key, key.current_version)
        alg = v.check_algorithm(algorithm)
        sig = v.sign_standard(data, alg)
        return {"signature": b64(sig), **v.describe(alg), "keyVersion": key.current_version}

    async def verify_standard(self, key: Key, data: bytes, sig: bytes, algorithm: str | None,
                              version: int | None) -> tuple[bool, int]:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        checks.limit(data, material.STANDARD_SIGN_MAX)
        version = key.current_version if version is None else version
        if version < 0 or version > key.current_version:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        v = await self.loaded(key, version)
        alg = v.check_algorithm(algorithm)
        return v.verify_standard(data, sig, alg), version

    async def export_symmetric(self, key: Key, version: int | None) -> tuple[bytes, int]:
        require_type(key, KeyType.SYMMETRIC_KEY)
        require_active(key)
        if not key.exportable:
            raise ExportNotAllowed("this key was not created exportable; its material never leaves the server")
        version = key.current_version if version is None else version
        return await self.version_raw(key, version), version

    async def export_private(self, key: Key, version: int | None) -> tuple[bytes, int]:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        if not key.exportable:
            raise ExportNotAllowed("this key was not created exportable; its private key never leaves the server")
        version = key.current_version if version is None else version
        return await self.version_raw(key, version), version

    async def public_key(self, key: Key, version: int | None) -> tuple[bytes, int]:
        require_type(key, KeyType.ASYMMETRIC_KEY)
        require_active(key)
        version = key.current_version if version is None else version
        row = await self.ctx.db.fetchone("SELECT key_id, version, public_der, status, seal FROM key_versions "
                                         "WHERE key_id = ? AND version = ?", key.id, version)
        if row is None:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        await self._require_sealed(row)
        return bytes(row["public_der"]), version
