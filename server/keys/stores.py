"""Projects and key stores: creation, lookup (key-store rows through the metadata cache), changes, deletion.

Key store deletion (the console form and `DELETE /api/v1/keystores/{id}` call it):
A store is deleted only when it holds no key at all (a key scheduled for deletion still counts:
it can be cancelled): 409 otherwise. Its client checks (IPv4, MAC entries, certificates) go
with it. Change requests of the store are removed too (the audit log keeps their history); a
pending one other than this deletion makes it refuse, so nobody's request vanishes undecided.
With approval on, `rt.changes.submit` turns the deletion into a change request first.
"""
from __future__ import annotations

import secrets
import string
from typing import TYPE_CHECKING, Any

from server import text, timeutil
from server.access.ops import op
from server.errors import Conflict, InvalidRequest, KeyStoreNotFound, NotFound
from server.events import Event
from server.keys import checks
from server.keys.context import KeyContext, is_unique_violation
from server.keys.model import KeyStore, Project

if TYPE_CHECKING:
    from server.access.changes import ChangeGate    # the access layer imports the key service

_APPKEY_ALPHABET = string.ascii_letters + string.digits
_PROJECT = "SELECT id, appkey, name, description, created_at FROM projects"


class Stores:
    def __init__(self, ctx: KeyContext) -> None:
        self.ctx = ctx
        self._projects: dict[str, Project] = {}      # appkey -> project: appkeys never change

    # ------------------------------------------------------------------ projects
    async def create_project(self, name: str, appkey: str | None = None, *, description: str = "") -> Project:
        text.check(name, "name")
        appkey = appkey or "".join(secrets.choice(_APPKEY_ALPHABET) for _ in range(16))
        now = timeutil.now_db()
        row = await self.ctx.insert_returning(
            "INSERT INTO projects (appkey, name, description, created_at) VALUES (?, ?, ?, ?) RETURNING id",
            appkey, name, description, now, conflict=f"a project named {name!r} already exists")
        return Project(row["id"], appkey, name, description, now)

    async def project_by_appkey(self, appkey: str) -> Project | None:
        p = self._projects.get(appkey)
        if p is None:
            row = await self.ctx.db.fetchone("SELECT id, appkey, name FROM projects WHERE appkey = ?", appkey)
            if row is None:
                return None
            p = self._projects[appkey] = Project(row["id"], row["appkey"], row["name"])
        return p

    async def project(self, project_id: int) -> Project | None:
        row = await self.ctx.db.fetchone(_PROJECT + " WHERE id = ?", project_id)
        return Project(**row) if row is not None else None

    async def projects(self) -> list[Project]:
        return [Project(**r) for r in await self.ctx.db.fetchall(_PROJECT + " ORDER BY id")]

    async def default_project(self) -> Project:
        row = await self.ctx.db.fetchone(_PROJECT + " ORDER BY id LIMIT 1")
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
        mode, mmode = checks.auth_mode(auth_mode), checks.mac_mode(mac_mode)
        now = timeutil.now_db()
        row = await self.ctx.insert_returning(
            """INSERT INTO keystores (project_id, name, description, ip4_auth, mac_auth, cert_auth, auth_mode,
               mac_mode, approval_required, approvals_needed, created_by, created_at, updated_by, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
            project_id, name, description, int(ip4_auth), int(mac_auth), int(cert_auth), mode.value,
            mmode.value, int(approval_required), approvals_needed, actor, now, actor, now,
            conflict=f"a key store named {name!r} already exists", sealed="keystores")
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
        mode, mmode = checks.auth_mode(merged["auth_mode"]), checks.mac_mode(merged["mac_mode"])
        if int(merged["approvals_needed"]) < 1:
            raise InvalidRequest("approvalsNeeded must be at least 1")
        try:
            # Checked first (an edited row is refused, not sealed afresh) and sealed with the change.
            await self.ctx.seal.update(self.ctx.db, "keystores", "id = ?", (ks.id,), {
                "name": merged["name"], "description": merged["description"],
                "ip4_auth": int(bool(merged["ip4_auth"])), "mac_auth": int(bool(merged["mac_auth"])),
                "cert_auth": int(bool(merged["cert_auth"])), "auth_mode": mode.value, "mac_mode": mmode.value,
                "approval_required": int(bool(merged["approval_required"])),
                "approvals_needed": int(merged["approvals_needed"]), "updated_by": actor,
                "updated_at": timeutil.now_db()})
        except Exception as e:  # unique violation on rename, whatever the backend calls it
            if is_unique_violation(e):
                raise Conflict(f"a key store named {merged['name']!r} already exists") from None
            raise
        await self.ctx.publish(Event(ks.id, "keystore_updated"))
        return await self.keystore(ks.id)

    async def keystore(self, keystore_id: int, project_id: int | None = None) -> KeyStore:
        meta = self.ctx.meta
        ks = meta.store(keystore_id)
        if ks is None:
            gen = meta.generation
            row = await self.ctx.db.fetchone("SELECT * FROM keystores WHERE id = ?", keystore_id)
            if row is None:
                raise KeyStoreNotFound(f"no key store with id {keystore_id}")
            ks = await self.from_row(row)
            meta.put_store(ks, gen)
        if project_id is not None and ks.project_id != project_id:
            raise KeyStoreNotFound(f"no key store with id {keystore_id}")
        return ks

    async def keystore_by_name(self, project_id: int, name: str) -> KeyStore:
        row = await self.ctx.db.fetchone("SELECT * FROM keystores WHERE project_id = ? AND name = ?",
                                         project_id, name)
        if row is None:
            raise KeyStoreNotFound("no key store with that name")
        return await self.from_row(row)

    async def keystores(self, project_id: int | None = None) -> list[KeyStore]:
        db = self.ctx.db
        if project_id is None:
            rows = await db.fetchall("SELECT * FROM keystores ORDER BY id")
        else:
            rows = await db.fetchall("SELECT * FROM keystores WHERE project_id = ? ORDER BY id", project_id)
        return [await self.from_row(r) for r in rows]

    async def from_row(self, row: dict) -> KeyStore:
        """The store as read, `intact` only when the row passes its seal."""
        ks = KeyStore.from_row(row)
        ks.intact = await self.ctx.seal.valid("keystores", row)
        return ks



async def delete_keystore(g: ChangeGate, ks: KeyStore, *, actor: str, applying: bool = False) -> dict:
    db = g.keys.db
    async with db.transaction() as tx:
        n = await tx.fetchval("SELECT COUNT(*) FROM keys WHERE keystore_id = ?", ks.id)
        if n:
            raise Conflict(f"the key store still holds {n} key{'s' if n != 1 else ''}: delete them first "
                           "(a key scheduled for deletion counts until it is purged)")
        pending = await tx.fetchval("SELECT COUNT(*) FROM change_requests WHERE keystore_id = ? AND "
                                    "status = 'PENDING' AND op <> 'keystore.delete'", ks.id)
        if pending:
            raise Conflict(f"the key store has {pending} pending change request(s): decide or cancel them first")
        await tx.execute("DELETE FROM change_approvals WHERE request_id IN "
                         "(SELECT id FROM change_requests WHERE keystore_id = ?)", ks.id)
        await tx.execute("DELETE FROM change_requests WHERE keystore_id = ?", ks.id)
        for table in ("auth_ipv4s", "auth_macs", "auth_certificates"):
            await tx.execute(f"DELETE FROM {table} WHERE keystore_id = ?", ks.id)
        await tx.execute("DELETE FROM keystores WHERE id = ?", ks.id)
    for kind in ("keystore_updated", "auth_changed"):      # caches drop the store and its checks
        await g.keys.events.publish(Event(ks.id, kind))
    return {"keyStoreId": ks.id, "name": ks.name, "deleted": True}


@op("keystore.delete")
async def _ks_delete(g: ChangeGate, p: dict, actor: str):
    ks = await g.keys.keystore(p["keystore_id"])
    return await delete_keystore(g, ks, actor=actor, applying=True)
