"""Key store deletion (the rule; the console form and `DELETE /api/v1/keystores/{id}` call it).

A store is deleted only when it holds no key at all (a key scheduled for deletion still counts:
it can be cancelled): 409 otherwise. Its client checks (IPv4, MAC entries, certificates) go
with it. Change requests of the store are removed too (the audit log keeps their history); a
pending one other than this deletion makes it refuse, so nobody's request vanishes undecided.
With approval on, `rt.changes.submit` turns the deletion into a change request first.
"""
from __future__ import annotations

from server.access.changes import ChangeGate, op
from server.errors import Conflict
from server.keys.model import KeyStore


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
    from server.events import Event
    for kind in ("keystore_updated", "auth_changed"):      # caches drop the store and its checks
        await g.keys.events.publish(Event(ks.id, kind))
    return {"keyStoreId": ks.id, "name": ks.name, "deleted": True}


@op("keystore.delete")
async def _ks_delete(g: ChangeGate, p: dict, actor: str):
    ks = await g.keys.keystore(p["keystore_id"])
    return await delete_keystore(g, ks, actor=actor, applying=True)
