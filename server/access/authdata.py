"""Key-store client authentication data: the rules for IPv4/CIDR and MAC entries.

Entries follow NHN's life cycle: ACTIVE -> SCHEDULED_DELETION (cancellable) ->
deleted; immediate deletion only from the scheduled state. Certificates live
in server/access/certificates.py.
"""
from __future__ import annotations

import datetime as dt
import ipaddress

from server import timeutil
from server.access.pki import normalize_mac
from server.access.seal import AccessSeal
from server.errors import Conflict, InvalidRequest, NotFound
from server.events import Event, EventBus
from server.keys.model import KeyStore
from server.storage.base import Storage

KINDS = {"ipv4s": "auth_ipv4s", "macs": "auth_macs"}


def normalize_ipv4(value: str) -> str:
    """A single address or a CIDR block, in canonical form (host bits must be zero)."""
    try:
        if "/" in value:
            net = ipaddress.IPv4Network(value.strip(), strict=True)
            return str(net.network_address) if net.prefixlen == 32 else str(net)
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise InvalidRequest("value must be an IPv4 address or CIDR block such as 10.0.0.0/24") from None


def normalize(kind: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidRequest("value must be a short string")
    if kind == "ipv4s":
        return normalize_ipv4(value)
    try:
        return normalize_mac(value)
    except ValueError:
        raise InvalidRequest("value must be a MAC address such as aa:bb:cc:dd:ee:ff") from None


def to_api(row: dict, intact: bool = True) -> dict:
    """NHN's entry object; `status` is INVALID for a row that fails its seal (it admits nobody)."""
    return {
        "value": row["value"], "description": row["description"], "status": row["status"] if intact else "INVALID",
        "lastAccessDatetime": timeutil.to_api(row["last_access_at"]),
        "deletionDatetime": timeutil.to_api(row["deletion_at"]),
        "creationUser": row["created_by"], "creationDatetime": timeutil.to_api(row["created_at"]),
        "lastChangeUser": row["updated_by"], "lastChangeDatetime": timeutil.to_api(row["updated_at"]),
    }


class AuthData:
    def __init__(self, storage: Storage, events: EventBus, seal: AccessSeal, grace_days: int = 7) -> None:
        self.db = storage
        self.events = events
        self.seal = seal              # entries are sealed rows (server/access/seal.py)
        self.grace_days = grace_days

    @staticmethod
    def _table(kind: str) -> str:
        try:
            return KINDS[kind]
        except KeyError:
            raise NotFound("auth data kind must be ipv4s or macs") from None

    async def add(self, ks: KeyStore, kind: str, value: str, description: str = "", *, actor: str) -> dict:
        table, v = self._table(kind), normalize(kind, value)
        now = timeutil.now_db()
        await self.seal.key()         # before the transaction: loading it may seal rows in one of its own
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchone(
                    f"INSERT INTO {table} (keystore_id, value, description, created_by, created_at, updated_by, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id", ks.id, v, description or "", actor,
                    now, actor, now)
                await self.seal.seal_new(tx, table, row["id"])
        except Exception as e:
            if "UniqueViolation" in type(e).__name__ or "UNIQUE" in str(e):
                raise Conflict("that value is already registered to this key store") from None
            raise
        await self.events.publish(Event(ks.id, "auth_changed"))
        return await self.get(ks, kind, v)

    async def get(self, ks: KeyStore, kind: str, value: str) -> dict:
        row = await self.db.fetchone(f"SELECT * FROM {self._table(kind)} WHERE keystore_id = ? AND value = ?",
                                     ks.id, normalize(kind, value))
        if row is None:
            raise NotFound("no such entry in this key store")
        return to_api(row, await self.seal.valid(self._table(kind), row))

    async def list(self, ks: KeyStore, kind: str, value: str | None = None) -> list[dict]:
        table = self._table(kind)
        if value is not None:
            rows = await self.db.fetchall(f"SELECT * FROM {table} WHERE keystore_id = ? AND value = ?",
                                          ks.id, normalize(kind, value))
        else:
            rows = await self.db.fetchall(f"SELECT * FROM {table} WHERE keystore_id = ? ORDER BY id", ks.id)
        return [to_api(r, await self.seal.valid(table, r)) for r in rows]

    async def schedule_deletion(self, ks: KeyStore, kind: str, value: str, *, actor: str) -> dict:
        table, v = self._table(kind), normalize(kind, value)
        when = timeutil.to_db(timeutil.now() + dt.timedelta(days=self.grace_days))
        # Only narrows: allowed on a row failing its seal, which keeps failing (no cancelling it back in).
        n = await self.seal.update(self.db, table, "keystore_id = ? AND value = ? AND status = 'ACTIVE'", (ks.id, v), {
            "status": "SCHEDULED_DELETION", "deletion_at": when, "updated_by": actor,
            "updated_at": timeutil.now_db()}, check=False)
        if n != 1:
            raise NotFound("no such entry in service in this key store")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return {"value": v, "deletionDateTime": timeutil.to_api(when)}

    async def cancel_deletion(self, ks: KeyStore, kind: str, value: str, *, actor: str) -> dict:
        table, v = self._table(kind), normalize(kind, value)
        n = await self.seal.update(self.db, table, "keystore_id = ? AND value = ? AND status = 'SCHEDULED_DELETION'",
                                   (ks.id, v), {"status": "ACTIVE", "deletion_at": None, "updated_by": actor,
                                                "updated_at": timeutil.now_db()})
        if n != 1:
            raise NotFound("no such entry scheduled for deletion in this key store")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return await self.get(ks, kind, v)

    async def delete_now(self, ks: KeyStore, kind: str, value: str, *, actor: str) -> dict:
        table, v = self._table(kind), normalize(kind, value)
        n = await self.db.execute(f"DELETE FROM {table} WHERE keystore_id = ? AND value = ? "
                                  "AND status = 'SCHEDULED_DELETION'", ks.id, v)
        if n != 1:
            raise NotFound("schedule the entry for deletion first; only scheduled entries are deleted at once")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return {"value": v, "deletionDateTime": timeutil.to_api(timeutil.now())}

    async def purge_due(self, now: dt.datetime | None = None) -> int:
        cutoff = timeutil.to_db(now or timeutil.now())
        total = 0
        for table in KINDS.values():
            total += await self.db.execute(
                f"DELETE FROM {table} WHERE status = 'SCHEDULED_DELETION' AND deletion_at <= ?", cutoff)
        return total
