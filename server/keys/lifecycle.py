"""A key's life: create, rotate (a SECRET by a new value), update, schedule and cancel deletion, delete, purge.

Every change publishes its event (through KeyContext.publish) so caches here and in other
processes drop the old row.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid

from server import timeutil
from server.barrier.barrier import sealed_aad
from server.errors import Conflict, InvalidKeyStatus, InvalidRequest
from server.events import Event
from server.keys import checks, material
from server.keys.context import KeyContext, is_unique_violation
from server.keys.lookup import KeyLookup
from server.keys.model import DEFAULT_SPEC, SPECS, Key, KeyStatus, KeyStore, KeyType


class Lifecycle:
    def __init__(self, ctx: KeyContext, lookup: KeyLookup) -> None:
        self.ctx = ctx
        self.lookup = lookup          # every change answers with the key's fresh row

    async def create_key(self, ks: KeyStore, key_type: KeyType | str, name: str, description: str = "", *,
                         actor: str, key_spec: str | None = None, auto_rotation_days: int = 0,
                         exportable: bool = False, secret_value: str | None = None,
                         imported_material: bytes | None = None) -> Key:
        kt = checks.key_type(key_type)
        spec = key_spec or DEFAULT_SPEC[kt]
        if spec not in SPECS[kt]:
            raise InvalidRequest(f"keySpec for {kt.value} must be one of {', '.join(SPECS[kt])}")
        if not name or len(name) > 100:
            raise InvalidRequest("name must be 1 to 100 characters")
        rotation = 0 if kt is KeyType.SECRET else checks.validate_rotation(
            auto_rotation_days or 0, self.ctx.limits.min_auto_rotation_days)
        if kt is KeyType.SECRET:
            if secret_value is None:
                raise InvalidRequest("secretValue is required for a SECRET key")
            raw = checks.secret_bytes(secret_value)
            public = None
        elif imported_material is not None:
            if kt is not KeyType.SYMMETRIC_KEY or len(imported_material) != 32:
                raise InvalidRequest("only 32-byte AES-256 keys can be imported")
            raw, public, rotation = imported_material, None, 0
        else:
            raw, public = await asyncio.to_thread(material.generate, spec)
        key_id = uuid.uuid4().hex
        now = timeutil.now()
        next_rot = timeutil.to_db(now + dt.timedelta(days=rotation)) if rotation else None
        nowdb = timeutil.to_db(now)
        sealed = self.ctx.barrier.seal(raw, sealed_aad("key_versions", "material_sealed", key_id, 0))
        await self.ctx.seal.key()      # before the transaction: loading it may seal rows in one of its own
        try:
            async with self.ctx.db.transaction() as tx:
                await self.ctx.seal.insert(tx, "keys", {
                    "id": key_id, "keystore_id": ks.id, "name": name, "description": description,
                    "key_type": kt.value, "key_spec": spec, "status": KeyStatus.ACTIVE.value,
                    "exportable": int(exportable), "imported": int(imported_material is not None),
                    "auto_rotation_days": rotation, "next_rotation_at": next_rot, "current_version": 0,
                    "created_by": actor, "created_at": nowdb, "updated_by": actor, "updated_at": nowdb})
                await self.ctx.seal.insert(tx, "key_versions", {
                    "key_id": key_id, "version": 0, "status": "ACTIVE", "material_sealed": sealed,
                    "public_der": public, "created_at": nowdb})
        except Exception as e:
            if is_unique_violation(e):
                raise Conflict(f"a key named {name!r} already exists in this key store") from None
            raise
        await self.ctx.publish(Event(ks.id, "key_created", key_id, 0))
        return await self.lookup.key(key_id)

    async def rotate(self, key: Key, *, actor: str, new_secret: str | None = None) -> Key:
        """Add a version and make it primary. For a SECRET, the new version holds `new_secret`."""
        checks.require_active(key)
        if key.imported:
            raise InvalidRequest("imported keys cannot be rotated")
        if key.key_type is KeyType.SECRET:
            if new_secret is None:
                raise InvalidRequest("a SECRET is rotated by giving it a new secretValue")
            raw, public = checks.secret_bytes(new_secret), None
        else:
            raw, public = await asyncio.to_thread(material.generate, key.key_spec)
        now = timeutil.now()
        await self.ctx.seal.key()      # before the transaction: loading it may seal rows in one of its own
        async with self.ctx.db.transaction() as tx:
            # Bump first: the UPDATE locks the row, so concurrent rotations on PostgreSQL
            # serialise and each gets its own version (SQLite serialises writers anyway).
            next_rot = (timeutil.to_db(now + dt.timedelta(days=key.auto_rotation_days))
                        if key.auto_rotation_days else None)
            v = await tx.fetchval(
                "UPDATE keys SET current_version = current_version + 1, next_rotation_at = ?, updated_by = ?, "
                "updated_at = ? WHERE id = ? AND status = 'ACTIVE' RETURNING current_version",
                next_rot, actor, timeutil.to_db(now), key.id)
            if v is None:
                raise InvalidKeyStatus("the key is not in service")
            # The row as it was before the bump must pass its seal; then it is sealed with the new version.
            await self.ctx.seal.reseal(tx, "keys", key.id, {"current_version": v - 1})
            sealed = self.ctx.barrier.seal(raw, sealed_aad("key_versions", "material_sealed", key.id, v))
            await self.ctx.seal.insert(tx, "key_versions", {
                "key_id": key.id, "version": v, "status": "ACTIVE", "material_sealed": sealed, "public_der": public,
                "created_at": timeutil.to_db(now)})
        kind = "secret_updated" if key.key_type is KeyType.SECRET else "key_rotated"
        await self.ctx.publish(Event(key.keystore_id, kind, key.id, v))
        # Not with_versions: a secret updated every second has tens of thousands of versions, and a
        # write should not load them all (GET /keys/{id} lists them).
        return await self.lookup.key(key.id)

    async def update_secret(self, key: Key, value: str, *, actor: str) -> Key:
        checks.require_type(key, KeyType.SECRET)
        return await self.rotate(key, actor=actor, new_secret=value)

    async def update_key(self, key: Key, *, actor: str, description: str | None = None,
                         auto_rotation_days: int | None = None) -> Key:
        checks.require_active(key)
        desc = key.description if description is None else description
        days = key.auto_rotation_days
        next_rot = key.next_rotation_at
        if auto_rotation_days is not None and key.key_type is not KeyType.SECRET:
            days = checks.validate_rotation(auto_rotation_days, self.ctx.limits.min_auto_rotation_days)
            next_rot = timeutil.to_db(timeutil.now() + dt.timedelta(days=days)) if days else None
        await self.ctx.db.execute("UPDATE keys SET description = ?, auto_rotation_days = ?, next_rotation_at = ?, "
                                  "updated_by = ?, updated_at = ? WHERE id = ?",
                                  desc, days, next_rot, actor, timeutil.now_db(), key.id)
        self.ctx.meta.drop_key(key.id)
        return await self.lookup.key(key.id)

    async def schedule_deletion(self, key: Key, *, actor: str, days: int | None = None) -> Key:
        # Not require_active: a key whose row fails its seal may still be scheduled for deletion
        # (it only narrows, and the row keeps failing, so a cancellation is refused).
        if not key.active:
            raise InvalidKeyStatus("the key is scheduled for deletion already")
        grace = self.ctx.limits.deletion_grace_days if days is None else days
        when = timeutil.to_db(timeutil.now() + dt.timedelta(days=grace))
        n = await self.ctx.seal.update(self.ctx.db, "keys", "id = ? AND status = 'ACTIVE'", (key.id,), {
            "status": "SCHEDULED_DELETION", "deletion_at": when, "updated_by": actor,
            "updated_at": timeutil.now_db()}, check=False)
        if n != 1:
            raise InvalidKeyStatus("the key is not in service")
        await self.ctx.publish(Event(key.keystore_id, "key_scheduled_deletion", key.id))
        return await self.lookup.key(key.id)

    async def cancel_deletion(self, key: Key, *, actor: str) -> Key:
        n = await self.ctx.seal.update(self.ctx.db, "keys", "id = ? AND status = 'SCHEDULED_DELETION'", (key.id,), {
            "status": "ACTIVE", "deletion_at": None, "updated_by": actor, "updated_at": timeutil.now_db()})
        if n != 1:
            raise InvalidKeyStatus("only a key scheduled for deletion can have its deletion cancelled")
        await self.ctx.publish(Event(key.keystore_id, "key_deletion_cancelled", key.id))
        return await self.lookup.key(key.id)

    async def delete_now(self, key: Key, *, actor: str) -> str:
        """Immediate delete: only from SCHEDULED_DELETION. Returns the deletion time (API format)."""
        if key.status is not KeyStatus.SCHEDULED_DELETION:
            raise InvalidKeyStatus("schedule the key for deletion first; active keys cannot be deleted at once")
        await self.purge(key.id, key.keystore_id)
        return timeutil.to_api(timeutil.now())

    async def purge(self, key_id: str, keystore_id: int) -> None:
        async with self.ctx.db.transaction() as tx:
            await tx.execute("DELETE FROM key_versions WHERE key_id = ?", key_id)
            await tx.execute("DELETE FROM keys WHERE id = ?", key_id)
            await tx.execute("DELETE FROM key_holdings WHERE key_id = ?", key_id)   # its roll-out is over
        self.ctx.material.drop_key(key_id)
        self.ctx.meta.drop_key(key_id)
        await self.ctx.publish(Event(keystore_id, "key_deleted", key_id))
