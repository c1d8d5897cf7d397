"""Who may act, sealed to the system key: operators, their role grants, tokens and access keys.

Each row of these tables carries `seal`: HMAC-SHA256, under a random key kept sealed by the
barrier (`access_seal.key_sealed`, rewrapped like every sealed column), of the row's table, id and
the columns that decide what it allows. Whoever can write the database but does not hold the system
key can therefore not mint a token, set a password hash, raise a role, re-enable an operator, unbind
an access key from its project or stretch an expiry: a row whose seal does not match allows nothing.

What a seal cannot stop: putting back a whole row exactly as it was earlier (its old seal with it),
for example from an old copy of the database, undoes a later revocation of that row. The revocation
itself stays recorded in the keyed audit chain, which such a copy cannot rewrite.

The first start after this table exists seals the rows already there, in one transaction with the
creation of the key, and records `access.sealed` in the audit. From then on a missing key is tampering
(its record is in the chain), never a reason to seal again.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from typing import Any, Mapping

import structlog

from server.barrier.barrier import Barrier, sealed_aad
from server.jsontext import encoder
from server.errors import BarrierError, Sealed
from server.storage.base import Storage

log = structlog.get_logger("skm.access.seal")

PREFIX = "s1:"
SEALED_EVENT = "access.sealed"
# The columns each table's seal covers (id first): what a row allows, never bookkeeping (last use, description).
FIELDS: dict[str, tuple[str, ...]] = {
    # Who made an operator or a grant, and when, decide separation of duties (server/access/lineage.py).
    "operators": ("id", "name", "password_hash", "disabled", "deleted_at", "created_by_id", "created_at"),
    "operator_roles": ("id", "operator_id", "role", "project_id", "granted_by_id", "granted_at", "revoked_at"),
    "operator_tokens": ("id", "operator_id", "secret_hash", "expires_at", "revoked"),
    "user_access_keys": ("id", "operator_id", "project_id", "secret_hash", "expires_at", "revoked"),
    "oauth_tokens": ("id", "access_key_id", "token_hash", "expires_at", "revoked"),
}
_KEY_AAD = sealed_aad("access_seal", "key_sealed", 1)
_encode = encoder(ensure_ascii=False)


def columns(table: str) -> str:
    """The SELECT list a seal check needs."""
    return ", ".join(FIELDS[table]) + ", seal"


def _canon(table: str, row: Mapping[str, Any]) -> bytes:
    vals = []
    for f in FIELDS[table]:
        v = row.get(f)
        vals.append(int(v) if isinstance(v, bool) else v)
    return _encode([table, vals]).encode()


def _mac(key: bytes, table: str, row: Mapping[str, Any]) -> str:
    return PREFIX + hmac.new(key, _canon(table, row), hashlib.sha256).hexdigest()


class AccessSeal:
    def __init__(self, storage: Storage, barrier: Barrier) -> None:
        self.db = storage
        self.barrier = barrier
        self.audit = None            # server.audit.Audit: records the first seal (set once it is installed)
        self.metrics = None          # server.metrics.Metrics: counts rows that fail their seal
        self._key: bytes | None = None
        self._lock = asyncio.Lock()

    # ----------------------------------------------------------------- the key
    async def key(self) -> bytes:
        """The seal key; the first call of a fresh or upgraded database seals what is there."""
        if self._key is not None:
            return self._key
        if self.barrier.sealed:
            raise Sealed("operator credentials cannot be checked until the key server has its system key "
                         f"({self.barrier.sealed_reason}); see /healthz")
        async with self._lock:
            if self._key is None:
                self._key = await self._load()
        return self._key

    async def _load(self) -> bytes:
        row = await self.db.fetchone("SELECT key_sealed FROM access_seal WHERE id = 1")
        if row is not None and row["key_sealed"] is not None:
            return self._open(row["key_sealed"])
        if row is None or await self.db.fetchval("SELECT seq FROM audit_log WHERE action = ? LIMIT 1", SEALED_EVENT):
            # The migration made the row and the audit records the key's making: someone edited the database.
            log.error("access_seal_key_missing")
            raise BarrierError("the key that seals operators, roles and credentials is missing from the database "
                               "after it was made: the database was changed outside the key server; restore it "
                               "from a backup (docs/disaster-recovery.md)")
        key = os.urandom(32)
        counts: dict[str, int] = {}
        async with self.db.transaction() as tx:
            # Compare-and-set first: of replicas or workers starting together, one seals and the rest wait here.
            if await tx.execute("UPDATE access_seal SET key_sealed = ? WHERE id = 1 AND key_sealed IS NULL",
                                self.barrier.seal(key, _KEY_AAD)) == 1:
                for table in FIELDS:
                    rows = await tx.fetchall(f"SELECT {columns(table)} FROM {table} WHERE seal IS NULL")
                    for r in rows:
                        await tx.execute(f"UPDATE {table} SET seal = ? WHERE id = ? AND seal IS NULL",
                                         _mac(key, table, r), r["id"])
                    counts[table] = len(rows)
        if not counts:
            row = await self.db.fetchone("SELECT key_sealed FROM access_seal WHERE id = 1")
            return self._open(row["key_sealed"])
        log.info("access_rows_sealed", **counts)
        if self.audit is not None:
            await self.audit.event(SEALED_EVENT, actor="system", detail={"rows": counts})
        return key

    def _open(self, blob) -> bytes:
        return self.barrier.open(bytes(blob), _KEY_AAD)

    # ----------------------------------------------------------------- checks
    async def valid(self, table: str, row: Mapping[str, Any]) -> bool:
        """True when `row` (with every column of FIELDS[table] and `seal`) is as the key server wrote it."""
        expected = _mac(await self.key(), table, row)
        if hmac.compare_digest(expected, row.get("seal") or ""):
            return True
        log.warning("access_row_seal_mismatch", table=table, row_id=row.get("id"))
        if self.metrics is not None:
            self.metrics.seal_failures.labels(table).inc()
        return False

    async def require(self, table: str, row: Mapping[str, Any]) -> None:
        """Refuse to change a row that fails its seal: a new seal would launder what was edited."""
        if not await self.valid(table, row):
            raise BarrierError(f"a row of {table} (id {row.get('id')}) was changed outside the key server; "
                               "nothing was changed; restore it from a backup or delete it and create it again")

    # ----------------------------------------------------------------- writes
    async def insert(self, db, table: str, values: dict[str, Any]) -> None:
        """INSERT a row whose id the caller chose, sealed."""
        await insert_row(db, table, {**values, "seal": _mac(await self.key(), table, values)})

    async def seal_new(self, db, table: str, row_id: int) -> None:
        """Seal a row just inserted with a database-made id (in the same transaction)."""
        row = await db.fetchone(f"SELECT {columns(table)} FROM {table} WHERE id = ?", row_id)
        await db.execute(f"UPDATE {table} SET seal = ? WHERE id = ?", _mac(await self.key(), table, row), row_id)

    async def update(self, db, table: str, where: str, args: tuple, changes: dict[str, Any], *,
                     check: bool = True) -> int:
        """UPDATE the rows matching `where` with `changes` and seal them again; the number changed.

        `check`: each row must pass its seal first (a new seal would otherwise launder an edit). Only a
        change after which the row allows nothing (a revocation, a delete) may skip it."""
        key = await self.key()
        sets = ", ".join(f"{c} = ?" for c in changes)
        changed = 0
        for r in await db.fetchall(f"SELECT {columns(table)} FROM {table} WHERE {where}", *args):
            if check:
                await self.require(table, r)
            # Only the row as read: a change committed meanwhile is not overwritten.
            same = "seal = ?" if r["seal"] is not None else "seal IS NULL"
            changed += await db.execute(f"UPDATE {table} SET {sets}, seal = ? WHERE id = ? AND {same}",
                                        *changes.values(), _mac(key, table, {**r, **changes}), r["id"],
                                        *((r["seal"],) if r["seal"] is not None else ()))
        return changed


async def insert_row(db, table: str, values: dict[str, Any]) -> None:
    """INSERT `values` (column -> value) into `table`."""
    marks = ", ".join("?" * len(values))
    await db.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks})", *values.values())


def install(rt) -> None:
    seal = rt.access_seal
    seal.audit, seal.metrics = rt.audit, rt.metrics
