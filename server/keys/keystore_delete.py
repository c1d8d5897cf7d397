"""Deleting a key store (NHN allows it): only an empty one, all of its own records in one transaction.

A store still holding keys (active or scheduled for deletion) is refused: deleting the keys is a
separate, deliberate step (`skm key delete ID --now`), so a store deletion never destroys key material.
With the store go its client authentication data (IPv4/CIDR, MAC, certificates) and its change
requests: they reference the store, and their history stays in the audit log.
"""
from __future__ import annotations

from server import timeutil
from server.errors import Conflict
from server.events import Event
from server.keys.model import KeyStore

# Children first: each of these references keystores(id).
_CHILD_TABLES = ("auth_ipv4s", "auth_macs", "auth_certificates")


async def check_deletable(keys, ks: KeyStore) -> None:
    """Refuse (409) while the store holds keys; cheap enough to run before a change request is made."""
    _refuse_if_keys(await _key_counts(keys.db, ks.id), ks)


async def delete_keystore(keys, ks: KeyStore, *, actor: str) -> dict:
    """Delete an empty key store and what belongs to it; returns what was deleted (identifiers only)."""
    now = timeutil.now_db()
    async with keys.db.transaction() as tx:
        # Touch the row first: on PostgreSQL that locks it, so a concurrent key creation waits for us.
        if await tx.execute("UPDATE keystores SET updated_by = ?, updated_at = ? WHERE id = ?", actor, now,
                            ks.id) != 1:
            from server.errors import KeyStoreNotFound
            raise KeyStoreNotFound(f"no key store with id {ks.id}")
        _refuse_if_keys(await _key_counts(tx, ks.id), ks)
        for table in _CHILD_TABLES:
            await tx.execute(f"DELETE FROM {table} WHERE keystore_id = ?", ks.id)
        await tx.execute("DELETE FROM change_approvals WHERE request_id IN "
                         "(SELECT id FROM change_requests WHERE keystore_id = ?)", ks.id)
        await tx.execute("DELETE FROM change_requests WHERE keystore_id = ?", ks.id)
        await tx.execute("DELETE FROM keystores WHERE id = ?", ks.id)
    # Every cache (key-store rows, auth entries) and every sidecar stream hears it.
    await keys._publish(Event(ks.id, "keystore_deleted"))
    return {"keyStoreId": ks.id, "name": ks.name, "deletionDateTime": timeutil.to_api(timeutil.now())}


async def _key_counts(db, keystore_id: int) -> dict[str, int]:
    rows = await db.fetchall("SELECT status, COUNT(*) AS n FROM keys WHERE keystore_id = ? GROUP BY status",
                             keystore_id)
    return {r["status"]: int(r["n"]) for r in rows}


def _refuse_if_keys(counts: dict[str, int], ks: KeyStore) -> None:
    total = sum(counts.values())
    if not total:
        return
    scheduled = counts.get("SCHEDULED_DELETION", 0)
    held = f"{total} key(s)" + (f", {scheduled} of them scheduled for deletion" if scheduled else "")
    raise Conflict(f"key store {ks.name!r} still holds {held}; delete its keys first (schedule each for "
                   "deletion, then delete it now), then delete the key store")
