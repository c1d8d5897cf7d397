"""KeyService: the rules of key stores, keys and versions, over storage and the barrier.

Handlers stay thin: they parse, call one method here and render. Everything a
rule says (states, versions, limits, export) is decided in this module.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import string
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server import text, timeutil
from server.barrier.barrier import Barrier, sealed_aad
from server.errors import (Conflict, DataTooLarge, ExportNotAllowed, InvalidKeyId, InvalidKeyStatus,
                           InvalidKeyType, InvalidKeyVersion, InvalidKeyVersionStatus, InvalidRequest,
                           InvalidUserData, KeyStoreNotFound, NotFound)
from server.events import Event, EventBus
from server.keys import material
from server.keys.formats import b64, unpack_ciphertext, unpack_signature
from server.keys.model import (DEFAULT_SPEC, MAX_SECRET_BYTES, SPECS, AuthMode, Key, KeyStatus, KeyStore,
                               KeyType, MacMode, Project)
from server.storage.base import Executor, Storage

_APPKEY_ALPHABET = string.ascii_letters + string.digits
_PROJECT = "SELECT id, appkey, name, description, created_at FROM projects"
TOUCH_INTERVAL = 60.0          # seconds between last-access writes for one key
TOUCHED_MAX = 100_000


@dataclass(frozen=True)
class Limits:
    min_auto_rotation_days: int = 30
    deletion_grace_days: int = 7
    material_cache_entries: int = 4096
    meta_cache_entries: int = 20000
    meta_cache_max_age: float = 5.0


class _LRU:
    """Bounded cache of loaded key versions (parsed keys are costly: RSA especially).

    Secret values are held as bytearrays and overwritten with zeros when they leave
    the cache (evicted, key deleted, cache cleared): what Python lets us wipe. The
    cache is never logged or rendered.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def get(self, k):
        v = self._d.get(k)
        if v is not None:
            self._d.move_to_end(k)
        return v

    def put(self, k, v) -> None:
        old = self._d.get(k)
        if old is not None and old is not v:
            _wipe(old)
        self._d[k] = v
        self._d.move_to_end(k)
        while len(self._d) > self.size:
            _wipe(self._d.popitem(last=False)[1])

    def drop_key(self, key_id: str) -> None:
        for k in [k for k in self._d if k[0] == key_id]:
            _wipe(self._d.pop(k))

    def clear(self) -> None:
        for v in self._d.values():
            _wipe(v)
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


def _copy(obj: Any) -> Any:
    """A shallow copy of a row dataclass, so a caller's edits never reach the cache.

    dataclasses.replace re-runs __init__ and costs ~10 µs; this is the hot path's copy."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def _wipe(v: Any) -> None:
    if isinstance(v, bytearray):
        v[:] = bytes(len(v))


class _MetaCache:
    """Key and key-store rows by id, dropped on the change events every writer publishes.

    The event bus is drained synchronously at each lookup (no task to run); replicas on
    PostgreSQL relay their events into the same bus. A fill that raced with an event
    for the same id is not stored (generation check), and an entry older than
    `max_age` is read again, a bound on staleness should an event ever be lost.
    """

    def __init__(self, events: EventBus, size: int, max_age: float) -> None:
        self.size, self.max_age = size, max_age
        self._q = events.subscribe()
        self._keys: OrderedDict[str, tuple[float, Key]] = OrderedDict()
        self._stores: dict[int, tuple[float, KeyStore]] = {}
        self._gen = 0
        self.on_version_disabled = None       # KeyService drops that key's loaded versions (other processes too)

    def sync(self) -> None:
        q = self._q
        while not q.empty():
            ev = q.get_nowait()
            self._gen += 1
            if ev.kind == "reset":
                self.clear()
            if ev.key_id:
                self._keys.pop(ev.key_id, None)
                if ev.kind == "key_version_disabled" and self.on_version_disabled is not None:
                    self.on_version_disabled(ev.key_id)     # loaded material skips the status check
            if ev.kind in ("keystore_updated", "keystore_deleted"):
                self._stores.pop(ev.keystore_id, None)

    def clear(self) -> None:
        self._gen += 1
        self._keys.clear()
        self._stores.clear()

    @property
    def generation(self) -> int:
        self.sync()
        return self._gen

    def key(self, key_id: str) -> Key | None:
        self.sync()
        hit = self._keys.get(key_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age:
            return None
        return _copy(hit[1])

    def put_key(self, key: Key, gen: int) -> None:
        if self.generation != gen:
            return
        now = time.monotonic()
        self._keys[key.id] = (now, _copy(key))
        self._keys.move_to_end(key.id)
        # Oldest fill first (a hit does not reorder): drop what is over the size or too old to be served,
        # so the cache holds the keys used in the last max_age seconds, not the last `size` ever used.
        keys = self._keys
        while keys and (len(keys) > self.size or now - next(iter(keys.values()))[0] > self.max_age):
            keys.popitem(last=False)

    def drop_key(self, key_id: str) -> None:
        self._gen += 1
        self._keys.pop(key_id, None)

    def store(self, keystore_id: int) -> KeyStore | None:
        self.sync()
        hit = self._stores.get(keystore_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age:
            return None
        return _copy(hit[1])

    def put_store(self, ks: KeyStore, gen: int) -> None:
        if self.generation != gen:
            return
        if len(self._stores) >= self.size:
            self._stores.clear()
        self._stores[ks.id] = (time.monotonic(), _copy(ks))

    def drop_store(self, keystore_id: int) -> None:
        self._gen += 1
        self._stores.pop(keystore_id, None)


def _validate_rotation(days: int, limits: Limits) -> int:
    if days is None:
        return 0
    if days != 0 and days < limits.min_auto_rotation_days:
        raise InvalidRequest(f"autoRotationPeriod must be 0 (off) or at least {limits.min_auto_rotation_days} days")
    if days > 3650:
        raise InvalidRequest("autoRotationPeriod must be at most 3650 days")
    return days


class KeyService:
    def __init__(self, storage: Storage, barrier: Barrier, events: EventBus | None = None,
                 limits: Limits | None = None) -> None:
        self.db = storage
        self.barrier = barrier
        self.events = events or EventBus()
        self.limits = limits or Limits()
        self._cache = _LRU(self.limits.material_cache_entries)
        self._meta = _MetaCache(self.events, self.limits.meta_cache_entries, self.limits.meta_cache_max_age)
        self._meta.on_version_disabled = self.forget_material
        self._projects: dict[str, Project] = {}
        self._touch_pending: set[str] = set()
        self._touched: dict[str, float] = {}       # key id -> monotonic time its last access was known recent

    # ------------------------------------------------------------------ projects
    async def create_project(self, name: str, appkey: str | None = None, *, description: str = "") -> Project:
        text.check(name, "name")
        appkey = appkey or "".join(secrets.choice(_APPKEY_ALPHABET) for _ in range(16))
        now = timeutil.now_db()
        row = await self._insert_returning(
            "INSERT INTO projects (appkey, name, description, created_at) VALUES (?, ?, ?, ?) RETURNING id",
            appkey, name, description, now, conflict=f"a project named {name!r} already exists")
        return Project(row["id"], appkey, name, description, now)

    async def project_by_appkey(self, appkey: str) -> Project | None:
        p = self._projects.get(appkey)
        if p is None:
            row = await self.db.fetchone("SELECT id, appkey, name FROM projects WHERE appkey = ?", appkey)
            if row is None:
                return None
            p = self._projects[appkey] = Project(row["id"], row["appkey"], row["name"])
        return p

    async def project(self, project_id: int) -> Project | None:
        row = await self.db.fetchone(_PROJECT + " WHERE id = ?", project_id)
        return Project(**row) if row is not None else None

    async def projects(self) -> list[Project]:
        return [Project(**r) for r in await self.db.fetchall(_PROJECT + " ORDER BY id")]

    async def default_project(self) -> Project:
        row = await self.db.fetchone(_PROJECT + " ORDER BY id LIMIT 1")
        if row is None:
            raise NotFound("no project exists; run `skm server init`")
        return Project(**row)

    # ---------------------------------------------------------------- key stores
    async def create_keystore(self, project_id: int, name: str, description: str = "", *,
                              ip4_auth: bool = False, mac_auth: bool = False, cert_auth: bool = False,
                              auth_mode: str = "AND", mac_mode: str = "attested",
                              approval_required: bool = False, approvals_needed: int = 1,
                              actor: str) -> KeyStore:
        if not (ip4_auth or mac_auth or cert_auth):
            raise InvalidRequest("enable at least one client check: ip4AuthUse, macAuthUse or certificateAuthUse")
        text.check(name, "name"), text.check(description, "description")
        mode, mmode = _auth_mode(auth_mode), _mac_mode(mac_mode)
        now = timeutil.now_db()
        row = await self._insert_returning(
            """INSERT INTO keystores (project_id, name, description, ip4_auth, mac_auth, cert_auth, auth_mode,
               mac_mode, approval_required, approvals_needed, created_by, created_at, updated_by, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
            project_id, name, description, int(ip4_auth), int(mac_auth), int(cert_auth), mode.value,
            mmode.value, int(approval_required), approvals_needed, actor, now, actor, now,
            conflict=f"a key store named {name!r} already exists")
        return await self.keystore(row["id"])

    async def update_keystore(self, ks: KeyStore, *, actor: str, **changes: Any) -> KeyStore:
        allowed = {"description", "ip4_auth", "mac_auth", "cert_auth", "auth_mode", "mac_mode",
                   "approval_required", "approvals_needed", "name"}
        bad = set(changes) - allowed
        if bad:
            raise InvalidRequest(f"cannot change {', '.join(sorted(bad))}")
        merged = {k: getattr(ks, k) for k in allowed}
        merged.update({k: v for k, v in changes.items() if v is not None})
        if not (merged["ip4_auth"] or merged["mac_auth"] or merged["cert_auth"]):
            raise InvalidRequest("a key store needs at least one client check enabled")
        mode, mmode = _auth_mode(merged["auth_mode"]), _mac_mode(merged["mac_mode"])
        if int(merged["approvals_needed"]) < 1:
            raise InvalidRequest("approvalsNeeded must be at least 1")
        try:
            await self.db.execute(
                """UPDATE keystores SET name = ?, description = ?, ip4_auth = ?, mac_auth = ?, cert_auth = ?,
                   auth_mode = ?, mac_mode = ?, approval_required = ?, approvals_needed = ?, updated_by = ?,
                   updated_at = ? WHERE id = ?""",
                merged["name"], merged["description"], int(bool(merged["ip4_auth"])), int(bool(merged["mac_auth"])),
                int(bool(merged["cert_auth"])), mode.value, mmode.value, int(bool(merged["approval_required"])),
                int(merged["approvals_needed"]), actor, timeutil.now_db(), ks.id)
        except Exception as e:  # unique violation on rename, whatever the backend calls it
            if _is_unique_violation(e):
                raise Conflict(f"a key store named {merged['name']!r} already exists") from None
            raise
        await self._publish(Event(ks.id, "keystore_updated"))
        return await self.keystore(ks.id)

    async def keystore(self, keystore_id: int, project_id: int | None = None) -> KeyStore:
        ks = self._meta.store(keystore_id)
        if ks is None:
            gen = self._meta.generation
            row = await self.db.fetchone("SELECT * FROM keystores WHERE id = ?", keystore_id)
            if row is None:
                raise KeyStoreNotFound(f"no key store with id {keystore_id}")
            ks = KeyStore.from_row(row)
            self._meta.put_store(ks, gen)
        if project_id is not None and ks.project_id != project_id:
            raise KeyStoreNotFound(f"no key store with id {keystore_id}")
        return ks

    async def keystore_by_name(self, project_id: int, name: str) -> KeyStore:
        row = await self.db.fetchone("SELECT * FROM keystores WHERE project_id = ? AND name = ?", project_id, name)
        if row is None:
            raise KeyStoreNotFound("no key store with that name")
        return KeyStore.from_row(row)

    async def keystores(self, project_id: int | None = None) -> list[KeyStore]:
        if project_id is None:
            rows = await self.db.fetchall("SELECT * FROM keystores ORDER BY id")
        else:
            rows = await self.db.fetchall("SELECT * FROM keystores WHERE project_id = ? ORDER BY id", project_id)
        return [KeyStore.from_row(r) for r in rows]

    # --------------------------------------------------------------------- keys
    async def create_key(self, ks: KeyStore, key_type: KeyType | str, name: str, description: str = "", *,
                         actor: str, key_spec: str | None = None, auto_rotation_days: int = 0,
                         exportable: bool = False, secret_value: str | None = None,
                         imported_material: bytes | None = None) -> Key:
        kt = _key_type(key_type)
        spec = key_spec or DEFAULT_SPEC[kt]
        if spec not in SPECS[kt]:
            raise InvalidRequest(f"keySpec for {kt.value} must be one of {', '.join(SPECS[kt])}")
        if not name or len(name) > 100:
            raise InvalidRequest("name must be 1 to 100 characters")
        rotation = 0 if kt is KeyType.SECRET else _validate_rotation(auto_rotation_days or 0, self.limits)
        if kt is KeyType.SECRET:
            if secret_value is None:
                raise InvalidRequest("secretValue is required for a SECRET key")
            raw = _secret_bytes(secret_value)
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
        sealed = self.barrier.seal(raw, sealed_aad("key_versions", "material_sealed", key_id, 0))
        try:
            async with self.db.transaction() as tx:
                await tx.execute(
                    """INSERT INTO keys (id, keystore_id, name, description, key_type, key_spec, status, exportable,
                       imported, auto_rotation_days, next_rotation_at, current_version, created_by, created_at,
                       updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)""",
                    key_id, ks.id, name, description, kt.value, spec, KeyStatus.ACTIVE.value, int(exportable),
                    int(imported_material is not None), rotation, next_rot, actor, nowdb, actor, nowdb)
                await tx.execute(
                    "INSERT INTO key_versions (key_id, version, status, material_sealed, public_der, created_at) "
                    "VALUES (?, 0, 'ACTIVE', ?, ?, ?)", key_id, sealed, public, nowdb)
        except Exception as e:
            if _is_unique_violation(e):
                raise Conflict(f"a key named {name!r} already exists in this key store") from None
            raise
        await self._publish(Event(ks.id, "key_created", key_id, 0))
        return await self.key(key_id)

    async def key(self, key_id: str, *, project_id: int | None = None, with_versions: bool = False) -> Key:
        if not _is_key_id(key_id):
            raise InvalidKeyId("key ids are 32 lowercase hex characters")
        if not with_versions:
            return await self._key_cached(key_id, project_id)
        if project_id is None:
            row = await self.db.fetchone("SELECT * FROM keys WHERE id = ?", key_id)
        else:
            row = await self.db.fetchone(
                "SELECT k.* FROM keys k JOIN keystores s ON s.id = k.keystore_id WHERE k.id = ? AND s.project_id = ?",
                key_id, project_id)
        if row is None:
            raise InvalidKeyId("no key with that id")
        k = Key.from_row(row)
        if with_versions:
            k.versions = await self.db.fetchall(
                "SELECT version, status, created_at FROM key_versions WHERE key_id = ? ORDER BY version", key_id)
        return k

    async def _key_cached(self, key_id: str, project_id: int | None) -> Key:
        """The hot path's key lookup: metadata from the cache, the project checked through the store."""
        k = self._meta.key(key_id)
        if k is None:
            gen = self._meta.generation
            row = await self.db.fetchone("SELECT * FROM keys WHERE id = ?", key_id)
            if row is None:
                raise InvalidKeyId("no key with that id")
            k = Key.from_row(row)
            self._meta.put_key(k, gen)
        if project_id is not None:
            try:
                await self.keystore(k.keystore_id, project_id)
            except KeyStoreNotFound:
                raise InvalidKeyId("no key with that id") from None
        return k

    async def keys(self, keystore_id: int, *, key_type: str | None = None, name: str | None = None,
                   status: str | None = None, page: int = 1, page_size: int = 100,
                   after: str | None = None) -> list[Key]:
        """One page in creation order: by page number (NHN), or after a key id (keyset, for deep pages)."""
        where = "keystore_id = ?"
        args: list[Any] = [keystore_id]
        if key_type:
            where += " AND key_type = ?"
            args.append(_key_type(key_type).value)
        if name:
            where += " AND name = ?"
            args.append(name)
        if status == "active":
            where += " AND status = 'ACTIVE'"
        elif status == "inactive":
            where += " AND status <> 'ACTIVE'"
        offset = (page - 1) * page_size
        if after is not None:
            if not _is_key_id(after) or await self.db.fetchone(
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
        return [Key.from_row(r) for r in await self.db.fetchall(sql, *args)]

    async def key_ids(self, keystore_id: int) -> list[str]:
        rows = await self.db.fetchall("SELECT id FROM keys WHERE keystore_id = ? ORDER BY created_at, id", keystore_id)
        return [r["id"] for r in rows]

    async def rotate(self, key: Key, *, actor: str, new_secret: str | None = None) -> Key:
        """Add a version and make it primary. For a SECRET, the new version holds `new_secret`."""
        self._require_active(key)
        if key.imported:
            raise InvalidRequest("imported keys cannot be rotated")
        if key.key_type is KeyType.SECRET:
            if new_secret is None:
                raise InvalidRequest("a SECRET is rotated by giving it a new secretValue")
            raw, public = _secret_bytes(new_secret), None
        else:
            raw, public = await asyncio.to_thread(material.generate, key.key_spec)
        now = timeutil.now()
        async with self.db.transaction() as tx:
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
            sealed = self.barrier.seal(raw, sealed_aad("key_versions", "material_sealed", key.id, v))
            await tx.execute(
                "INSERT INTO key_versions (key_id, version, status, material_sealed, public_der, created_at) "
                "VALUES (?, ?, 'ACTIVE', ?, ?, ?)", key.id, v, sealed, public, timeutil.to_db(now))
        kind = "secret_updated" if key.key_type is KeyType.SECRET else "key_rotated"
        await self._publish(Event(key.keystore_id, kind, key.id, v))
        # Not with_versions: a secret updated every second has tens of thousands of versions, and a
        # write should not load them all (GET /keys/{id} lists them).
        return await self.key(key.id)

    async def update_key(self, key: Key, *, actor: str, description: str | None = None,
                         auto_rotation_days: int | None = None) -> Key:
        self._require_active(key)
        desc = key.description if description is None else description
        days = key.auto_rotation_days
        next_rot = key.next_rotation_at
        if auto_rotation_days is not None and key.key_type is not KeyType.SECRET:
            days = _validate_rotation(auto_rotation_days, self.limits)
            next_rot = timeutil.to_db(timeutil.now() + dt.timedelta(days=days)) if days else None
        await self.db.execute("UPDATE keys SET description = ?, auto_rotation_days = ?, next_rotation_at = ?, "
                              "updated_by = ?, updated_at = ? WHERE id = ?",
                              desc, days, next_rot, actor, timeutil.now_db(), key.id)
        self._meta.drop_key(key.id)
        return await self.key(key.id)

    async def schedule_deletion(self, key: Key, *, actor: str, days: int | None = None) -> Key:
        self._require_active(key)
        grace = self.limits.deletion_grace_days if days is None else days
        when = timeutil.to_db(timeutil.now() + dt.timedelta(days=grace))
        n = await self.db.execute("UPDATE keys SET status = 'SCHEDULED_DELETION', deletion_at = ?, updated_by = ?, "
                                  "updated_at = ? WHERE id = ? AND status = 'ACTIVE'",
                                  when, actor, timeutil.now_db(), key.id)
        if n != 1:
            raise InvalidKeyStatus("the key is not in service")
        await self._publish(Event(key.keystore_id, "key_scheduled_deletion", key.id))
        return await self.key(key.id)

    async def cancel_deletion(self, key: Key, *, actor: str) -> Key:
        n = await self.db.execute("UPDATE keys SET status = 'ACTIVE', deletion_at = NULL, updated_by = ?, "
                                  "updated_at = ? WHERE id = ? AND status = 'SCHEDULED_DELETION'",
                                  actor, timeutil.now_db(), key.id)
        if n != 1:
            raise InvalidKeyStatus("only a key scheduled for deletion can have its deletion cancelled")
        await self._publish(Event(key.keystore_id, "key_deletion_cancelled", key.id))
        return await self.key(key.id)

    async def delete_now(self, key: Key, *, actor: str) -> str:
        """Immediate delete: only from SCHEDULED_DELETION. Returns the deletion time (API format)."""
        if key.status is not KeyStatus.SCHEDULED_DELETION:
            raise InvalidKeyStatus("schedule the key for deletion first; active keys cannot be deleted at once")
        await self._purge(key.id, key.keystore_id)
        return timeutil.to_api(timeutil.now())

    async def _purge(self, key_id: str, keystore_id: int) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM key_versions WHERE key_id = ?", key_id)
            await tx.execute("DELETE FROM keys WHERE id = ?", key_id)
        self._cache.drop_key(key_id)
        self._meta.drop_key(key_id)
        await self._publish(Event(keystore_id, "key_deleted", key_id))

    # ------------------------------------------------------------ background jobs
    async def purge_due(self, now: dt.datetime | None = None) -> int:
        rows = await self.db.fetchall("SELECT id, keystore_id FROM keys WHERE status = 'SCHEDULED_DELETION' "
                                      "AND deletion_at <= ?", timeutil.to_db(now or timeutil.now()))
        for r in rows:
            await self._purge(r["id"], r["keystore_id"])
        return len(rows)

    async def rotate_due(self, now: dt.datetime | None = None) -> int:
        rows = await self.db.fetchall("SELECT * FROM keys WHERE status = 'ACTIVE' AND next_rotation_at IS NOT NULL "
                                      "AND next_rotation_at <= ?", timeutil.to_db(now or timeutil.now()))
        for r in rows:
            await self.rotate(Key.from_row(r), actor="SECURE_KEY_MANAGER")
        return len(rows)

    # ---------------------------------------------------------------- operations
    def _require_active(self, key: Key) -> None:
        if not key.active:
            raise InvalidKeyStatus("the key is scheduled for deletion; cancel the deletion to use it")

    @staticmethod
    def _require_type(key: Key, kt: KeyType) -> None:
        if key.key_type is not kt:
            raise InvalidKeyType(f"this operation needs a {kt.value} key; this key is a {key.key_type.value}")

    async def _version_raw(self, key: Key, version: int) -> bytes:
        row = await self.db.fetchone("SELECT status, material_sealed FROM key_versions WHERE key_id = ? AND version = ?",
                                     key.id, version)
        if row is None:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        if row["status"] == "DISABLED":
            raise InvalidKeyVersionStatus(f"key version {version} is disabled; an operator can re-enable it "
                                          f"(skm key version enable {key.id} {version})")
        if row["status"] != "ACTIVE":
            raise InvalidKeyVersionStatus(f"key version {version} is not in service")
        return self.barrier.open(bytes(row["material_sealed"]), sealed_aad("key_versions", "material_sealed", key.id, version))

    async def _loaded(self, key: Key, version: int):
        hit = self._cache.get((key.id, version))
        if hit is not None:
            return hit
        raw = await self._version_raw(key, version)
        if key.key_type is KeyType.SYMMETRIC_KEY:
            obj: Any = material.SymmetricVersion(key.id, version, raw)
        elif key.key_type is KeyType.ASYMMETRIC_KEY:
            obj = material.AsymmetricVersion(key.id, version, key.key_spec, raw)
        else:
            # A (key, version) never changes content: a rotation makes a new version, and the
            # key row (current_version, status) comes fresh from the event-invalidated cache.
            obj = bytearray(raw)
        self._cache.put((key.id, version), obj)
        return obj

    def forget_material(self, key_id: str) -> None:
        """Drop a key's loaded versions (a version was disabled: the next use re-reads its status)."""
        self._cache.drop_key(key_id)
        self._meta.drop_key(key_id)

    def touch(self, key: Key) -> None:
        """Record last access at most once a minute per key, off the request path."""
        mono = time.monotonic()
        seen = self._touched.get(key.id)
        if seen is not None and mono - seen < TOUCH_INTERVAL:
            return                                   # the common case: no date parsing per request
        last = timeutil.from_db(key.last_access_at)
        if last:
            age = (timeutil.now() - last).total_seconds()
            if 0 <= age < TOUCH_INTERVAL:
                self._remember_touch(key.id, mono - age)
                return
        if key.id in self._touch_pending:
            return
        self._touch_pending.add(key.id)
        self._remember_touch(key.id, mono)

        async def _write() -> None:
            try:
                await self.db.execute("UPDATE keys SET last_access_at = ? WHERE id = ?", timeutil.now_db(), key.id)
                self._meta.drop_key(key.id)     # the cached row's last access is now old
            except Exception:  # best effort: an access timestamp never fails a request
                pass
            finally:
                self._touch_pending.discard(key.id)
        asyncio.get_running_loop().create_task(_write())

    def _remember_touch(self, key_id: str, at: float) -> None:
        if len(self._touched) >= TOUCHED_MAX:     # bounded: forgetting only costs one date parse
            self._touched.clear()
        self._touched[key_id] = at

    async def secret_value(self, key: Key) -> str:
        self._require_type(key, KeyType.SECRET)
        self._require_active(key)
        return (await self._loaded(key, key.current_version)).decode("utf-8")

    async def update_secret(self, key: Key, value: str, *, actor: str) -> Key:
        self._require_type(key, KeyType.SECRET)
        return await self.rotate(key, actor=actor, new_secret=value)

    async def encrypt(self, key: Key, plaintext: str) -> tuple[str, int]:
        self._require_type(key, KeyType.SYMMETRIC_KEY)
        self._require_active(key)
        data = _text_bytes(plaintext, "plaintext")
        v = await self._loaded(key, key.current_version)
        return v.encrypt(data), key.current_version

    async def decrypt(self, key: Key, ciphertext: str) -> tuple[str, int]:
        self._require_type(key, KeyType.SYMMETRIC_KEY)
        self._require_active(key)
        if len(ciphertext) > 2 * MAX_SECRET_BYTES:
            raise InvalidRequest("ciphertext is longer than any ciphertext this server makes")
        version, nonce, sealed = unpack_ciphertext(ciphertext)
        if version > key.current_version:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        v = await self._loaded(key, version)
        try:
            return v.decrypt(nonce, sealed).decode("utf-8"), version
        except UnicodeDecodeError:
            raise InvalidUserData("ciphertext does not hold text") from None

    async def create_local_key(self, key: Key) -> dict:
        self._require_type(key, KeyType.SYMMETRIC_KEY)
        self._require_active(key)
        plain = b64(os.urandom(32))
        v = await self._loaded(key, key.current_version)
        return {"localKeyPlaintext": plain, "localKeyCiphertext": v.encrypt(plain.encode("ascii")),
                "keyVersion": key.current_version}

    async def sign(self, key: Key, plaintext: str) -> tuple[str, int]:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        data = _text_bytes(plaintext, "plaintext", limit=material.LEGACY_SIGN_MAX)
        v = await self._loaded(key, key.current_version)
        return v.sign_legacy(data), key.current_version

    async def verify(self, key: Key, plaintext: str, signature: str) -> tuple[bool, int]:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        data = _text_bytes(plaintext, "plaintext", limit=material.LEGACY_SIGN_MAX)
        if len(signature) > 4096:
            raise InvalidRequest("signature is longer than any signature this server makes")
        version, sig = unpack_signature(signature)
        if version > key.current_version:
            return False, version
        v = await self._loaded(key, version)
        return v.verify_legacy(data, sig), version

    async def sign_standard(self, key: Key, data: bytes, algorithm: str | None) -> dict:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        _limit(data, material.STANDARD_SIGN_MAX)
        v = await self._loaded(key, key.current_version)
        alg = v.check_algorithm(algorithm)
        sig = v.sign_standard(data, alg)
        return {"signature": b64(sig), **v.describe(alg), "keyVersion": key.current_version}

    async def verify_standard(self, key: Key, data: bytes, sig: bytes, algorithm: str | None,
                              version: int | None) -> tuple[bool, int]:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        _limit(data, material.STANDARD_SIGN_MAX)
        version = key.current_version if version is None else version
        if version < 0 or version > key.current_version:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        v = await self._loaded(key, version)
        alg = v.check_algorithm(algorithm)
        return v.verify_standard(data, sig, alg), version

    async def export_symmetric(self, key: Key, version: int | None) -> tuple[bytes, int]:
        self._require_type(key, KeyType.SYMMETRIC_KEY)
        self._require_active(key)
        if not key.exportable:
            raise ExportNotAllowed("this key was not created exportable; its material never leaves the server")
        version = key.current_version if version is None else version
        return await self._version_raw(key, version), version

    async def export_private(self, key: Key, version: int | None) -> tuple[bytes, int]:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        if not key.exportable:
            raise ExportNotAllowed("this key was not created exportable; its private key never leaves the server")
        version = key.current_version if version is None else version
        return await self._version_raw(key, version), version

    async def public_key(self, key: Key, version: int | None) -> tuple[bytes, int]:
        self._require_type(key, KeyType.ASYMMETRIC_KEY)
        self._require_active(key)
        version = key.current_version if version is None else version
        row = await self.db.fetchone("SELECT public_der, status FROM key_versions WHERE key_id = ? AND version = ?",
                                     key.id, version)
        if row is None:
            raise InvalidKeyVersion(f"key version {version} does not exist")
        return bytes(row["public_der"]), version

    # --------------------------------------------------------------------- utils
    async def _publish(self, event: Event) -> None:
        # Drop our own cached rows first: with a replication relay the bus hears the event
        # only once it has gone round, and the writer must not read its old row meanwhile.
        if event.key_id:
            self._meta.drop_key(event.key_id)
        self._meta.drop_store(event.keystore_id)
        await self.events.publish(event)

    async def _insert_returning(self, sql: str, *args: Any, conflict: str) -> dict:
        try:
            async with self.db.transaction() as tx:
                return await tx.fetchone(sql, *args)
        except Exception as e:
            if _is_unique_violation(e):
                raise Conflict(conflict) from None
            raise


def _is_key_id(s: str) -> bool:
    return len(s) == 32 and all(c in "0123456789abcdef" for c in s)


def _is_unique_violation(e: Exception) -> bool:
    name = type(e).__name__
    return "UniqueViolation" in name or (name == "IntegrityError" and "UNIQUE" in str(e))


def _key_type(v: KeyType | str) -> KeyType:
    try:
        return v if isinstance(v, KeyType) else KeyType(v)
    except ValueError:
        raise InvalidRequest("keyType must be SECRET, SYMMETRIC_KEY or ASYMMETRIC_KEY") from None


def _auth_mode(v: str | AuthMode) -> AuthMode:
    if isinstance(v, AuthMode):
        return v
    try:
        return AuthMode(str(v).upper())
    except ValueError:
        raise InvalidRequest("authMode must be AND or OR") from None


def _mac_mode(v: str | MacMode) -> MacMode:
    if isinstance(v, MacMode):
        return v
    try:
        return MacMode(str(v).lower())
    except ValueError:
        raise InvalidRequest("macVerification must be header, attested or neighbor") from None


def _secret_bytes(value: str) -> bytes:
    if value == "":
        # An empty secret is always a mistake upstream (an unset variable, an empty pipe): refuse it.
        raise InvalidRequest("secretValue must not be empty")
    return _text_bytes(value, "secretValue")


def _text_bytes(value: str, what: str, limit: int = MAX_SECRET_BYTES) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} must be valid Unicode text") from None
    if len(data) > limit:
        raise DataTooLarge(f"{what} must be {limit} bytes or less (UTF-8)")
    return data


def _limit(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise DataTooLarge(f"data must be {limit} bytes or less after base64 decoding")
