"""Reading keys: one key by id (the hot path, through the metadata cache), a store's keys by page, their ids."""
from __future__ import annotations

from typing import Any

from server.errors import InvalidKeyId, InvalidRequest, KeyStoreNotFound
from server.keys import checks
from server.keys.context import KeyContext
from server.keys.model import Key, KeyStore
from server.keys.stores import Stores


class KeyLookup:
    def __init__(self, ctx: KeyContext, stores: Stores) -> None:
        self.ctx = ctx
        self.stores = stores          # a key's project is checked through its store

    async def key(self, key_id: str, *, project_id: int | None = None, with_versions: bool = False) -> Key:
        if not checks.is_key_id(key_id):
            raise InvalidKeyId("key ids are 32 lowercase hex characters")
        if not with_versions:
            return await self._key_cached(key_id, project_id)
        db = self.ctx.db
        if project_id is None:
            row = await db.fetchone("SELECT * FROM keys WHERE id = ?", key_id)
        else:
            row = await db.fetchone(
                "SELECT k.* FROM keys k JOIN keystores s ON s.id = k.keystore_id WHERE k.id = ? AND s.project_id = ?",
                key_id, project_id)
        if row is None:
            raise InvalidKeyId("no key with that id")
        k = await self.from_row(row)
        seal = self.ctx.seal
        k.versions = [{"version": v["version"], "created_at": v["created_at"],
                       "status": v["status"] if await seal.valid("key_versions", v) else "INVALID"}
                      for v in await db.fetchall("SELECT key_id, version, status, created_at, seal FROM key_versions "
                                                 "WHERE key_id = ? ORDER BY version", key_id)]
        return k

    async def _key_cached(self, key_id: str, project_id: int | None) -> Key:
        """The hot path's key lookup: metadata from the cache, the project checked through the store."""
        k = await self._meta(key_id)
        if project_id is not None:
            await self._store_in(k, project_id)
        return k

    async def key_in_project(self, key_id: str, project_id: int) -> tuple[Key, KeyStore]:
        """A client's key and its store, both from the cache: the store that proves the key is in the
        caller's project is the one whose checks the caller must then pass (one lookup, not two)."""
        if not checks.is_key_id(key_id):
            raise InvalidKeyId("key ids are 32 lowercase hex characters")
        k = await self._meta(key_id)
        return k, await self._store_in(k, project_id)

    async def _meta(self, key_id: str) -> Key:
        meta = self.ctx.meta
        k = meta.key(key_id)
        if k is None:
            gen = meta.generation
            row = await self.ctx.db.fetchone("SELECT * FROM keys WHERE id = ?", key_id)
            if row is None:
                raise InvalidKeyId("no key with that id")
            k = await self.from_row(row)
            meta.put_key(k, gen)
        return k

    async def _store_in(self, k: Key, project_id: int) -> KeyStore:
        """The key's store when it belongs to `project_id`; otherwise the key does not exist for the caller."""
        try:
            return await self.stores.keystore(k.keystore_id, project_id)
        except KeyStoreNotFound:
            raise InvalidKeyId("no key with that id") from None

    async def keys(self, keystore_id: int, *, key_type: str | None = None, name: str | None = None,
                   status: str | None = None, page: int = 1, page_size: int = 100,
                   after: str | None = None) -> list[Key]:
        """One page in creation order: by page number (NHN), or after a key id (keyset, for deep pages)."""
        db = self.ctx.db
        where = "keystore_id = ?"
        args: list[Any] = [keystore_id]
        if key_type:
            where += " AND key_type = ?"
            args.append(checks.key_type(key_type).value)
        if name:
            where += " AND name = ?"
            args.append(name)
        if status == "active":
            where += " AND status = 'ACTIVE'"
        elif status == "inactive":
            where += " AND status <> 'ACTIVE'"
        offset = (page - 1) * page_size
        if after is not None:
            if not checks.is_key_id(after) or await db.fetchone(
                    "SELECT 1 AS x FROM keys WHERE id = ? AND keystore_id = ?", after, keystore_id) is None:
                raise InvalidRequest("after must be the id of a key in this key store (the last key of the "
                                     "previous page)")
            # Row-value comparison walks the (keystore_id, created_at, id) index from the cursor on.
            where += " AND (created_at, id) > (SELECT created_at, id FROM keys WHERE id = ? AND keystore_id = ?)"
            args += [after, keystore_id]
            offset = 0
        # Deferred join: the page's ids come from the covering index, so skipped rows are never read.
        sql = (f"SELECT k.* FROM keys k JOIN (SELECT id FROM keys WHERE {where} ORDER BY created_at, id "
               "LIMIT ? OFFSET ?) p ON p.id = k.id ORDER BY k.created_at, k.id")
        args += [page_size, offset]
        return [await self.from_row(r) for r in await db.fetchall(sql, *args)]

    async def from_row(self, row: dict) -> Key:
        """The key as read, `intact` only when the row passes its seal (require_active refuses it otherwise)."""
        k = Key.from_row(row)
        k.intact = await self.ctx.seal.valid("keys", row)
        return k

    async def key_ids(self, keystore_id: int) -> list[str]:
        rows = await self.ctx.db.fetchall("SELECT id FROM keys WHERE keystore_id = ? ORDER BY created_at, id",
                                          keystore_id)
        return [r["id"] for r in rows]
