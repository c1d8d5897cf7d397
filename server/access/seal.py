"""Who may act and who may reach what, sealed to the system key.

Sealed tables: operators, their role grants, tokens and access keys (who may act); key stores, their
IPv4/MAC entries and certificates, keys and key versions (which clients reach which key, and how);
change requests and their approvals (what approvers agreed to).

Each row of these tables carries `seal`: HMAC-SHA256, under a random key kept sealed by the
barrier (`access_seal.key_sealed`, rewrapped like every sealed column), of the row's table, id and
the columns that decide what it allows. Whoever can write the database but does not hold the system
key can therefore not mint a token, set a password hash, raise a role, re-enable an operator, unbind
an access key from its project or stretch an expiry; nor add their address to a key store, switch a
check or the approval rule off, bring back an entry scheduled for deletion, move a key into a store
they pass, make a key exportable, turn a key into a readable secret or re-enable a disabled version;
nor change what a pending request applies, lower the approvals it needs or add approvals. A row whose
seal does not match allows nothing: a key store refuses every client and every change, a key or version
refuses every use, a change request is never approved, an approval does not count.

What a seal cannot stop: putting back a whole row exactly as it was earlier (its old seal with it),
for example from an old copy of the database, undoes a later revocation of that row. The revocation
itself stays recorded in the keyed audit chain, which such a copy cannot rewrite.

The first start after a table joins FIELDS seals the rows already there, in one transaction with the
creation of the key (or with `access_seal.tables`, the tables sealed so far), and records
`access.sealed` in the audit with the tables it sealed. From then on a missing key, or a table gone from
`tables`, is tampering (its record is in the chain), never a reason to seal again.

A change that only narrows what a row allows (a revocation, a scheduled deletion) is made even on a row
that fails its seal, and leaves it failing: sealing it afresh would let the change be undone through
the server (cancel a deletion) with the edit laundered.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from typing import Any, Mapping

from server import logs
from server.barrier.barrier import Barrier, sealed_aad
from server.errors import BarrierError, Sealed
from server.jsontext import encoder
from server.storage.base import Storage

log = logs.get("skm.access.seal")

PREFIX = "s1:"
SEALED_EVENT = "access.sealed"
# The columns each table's seal covers (its primary key first): what a row allows, never bookkeeping (last
# use, description).
FIELDS: dict[str, tuple[str, ...]] = {
    # Who made an operator or a grant, and when, decide separation of duties (server/access/lineage.py).
    "operators": ("id", "name", "password_hash", "disabled", "deleted_at", "created_by_id", "created_at", "lineage"),
    "operator_roles": ("id", "operator_id", "role", "project_id", "granted_by_id", "granted_at", "revoked_at"),
    "operator_tokens": ("id", "operator_id", "secret_hash", "expires_at", "revoked"),
    "user_access_keys": ("id", "operator_id", "project_id", "secret_hash", "expires_at", "revoked"),
    "oauth_tokens": ("id", "access_key_id", "token_hash", "expires_at", "revoked"),
    # Which checks a store runs, how they combine and whether its changes wait for approvers.
    "keystores": ("id", "project_id", "ip4_auth", "mac_auth", "cert_auth", "auth_mode", "mac_mode",
                  "approval_required", "approvals_needed"),
    "auth_ipv4s": ("id", "keystore_id", "value", "status"),
    "auth_macs": ("id", "keystore_id", "value", "status"),
    "auth_certificates": ("id", "keystore_id", "fingerprint", "expires_at", "status"),
    # A key's store decides who reaches it; its type and spec what its material is served as; its
    # current version what new ciphertext and signatures use.
    "keys": ("id", "keystore_id", "key_type", "key_spec", "status", "exportable", "current_version"),
    # A version disabled as compromised stays disabled.
    "key_versions": ("key_id", "version", "status"),
    # What approvers are shown is what is applied, by whom it was asked and how many must agree; a decided
    # request stays decided.
    "change_requests": ("id", "keystore_id", "project_id", "op", "params", "diff", "approvals_needed",
                        "requested_by", "requester_id", "created_at", "expires_at", "status"),
    "change_approvals": ("request_id", "operator", "operator_id"),
}
# Columns added to a sealed table after its rows were sealed: left out of the seal while NULL, so those
# rows keep their seals; once set, a seal covers them (and emptying one again breaks it).
LATER: frozenset[str] = frozenset({"lineage"})
# Primary keys other than `id` (a seal names its row by them).
PRIMARY: dict[str, tuple[str, ...]] = {"key_versions": ("key_id", "version"),
                                       "change_approvals": ("request_id", "operator")}


def _pk(table: str) -> tuple[str, ...]:
    return PRIMARY.get(table, ("id",))


def _where_pk(table: str) -> str:
    return " AND ".join(f"{c} = ?" for c in _pk(table))


def _pk_of(table: str, row: Mapping[str, Any]) -> tuple:
    return tuple(row.get(c) for c in _pk(table))


_KEY_AAD = sealed_aad("access_seal", "key_sealed", 1)
_encode = encoder(ensure_ascii=False)


def columns(table: str) -> str:
    """The SELECT list a seal check needs."""
    return ", ".join(FIELDS[table]) + ", seal"


def _canon(table: str, row: Mapping[str, Any]) -> bytes:
    vals = []
    for f in FIELDS[table]:
        v = row.get(f)
        if v is None and f in LATER:
            continue
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
            raise Sealed("operators, key stores and keys cannot be checked until the key server has its system "
                         f"key ({self.barrier.sealed_reason}); see /healthz")
        async with self._lock:
            if self._key is None:
                self._key = await self._load()
        return self._key

    async def _load(self) -> bytes:
        row = await self.db.fetchone("SELECT key_sealed, tables FROM access_seal WHERE id = 1")
        done = set(filter(None, (row["tables"] or "").split(","))) if row is not None else set()
        missing = [t for t in FIELDS if t not in done]
        if row is not None and row["key_sealed"] is not None and not missing:
            return self._open(row["key_sealed"])
        recorded = await self._recorded()
        if row is None or (row["key_sealed"] is None and (done or recorded)) or recorded & set(missing):
            # The migration made the row and the audit records the sealing: someone edited the database.
            log.error("access_seal_key_missing", tables=sorted(recorded & set(missing)))
            raise BarrierError("the key that seals operators, key stores and keys, or the record of which tables "
                               "it seals, is missing from the database after it was made: the database was "
                               "changed outside the key server; restore it from a backup "
                               "(docs/disaster-recovery.md)")
        fresh = row["key_sealed"] is None
        key = os.urandom(32) if fresh else self._open(row["key_sealed"])
        tables = ",".join(t for t in FIELDS if t in done or t in missing)
        counts: dict[str, int] = {}
        async with self.db.transaction() as tx:
            # Compare-and-set first: of replicas or workers starting together, one seals and the rest wait here.
            if fresh:
                won = await tx.execute("UPDATE access_seal SET key_sealed = ?, tables = ? "
                                       "WHERE id = 1 AND key_sealed IS NULL", self.barrier.seal(key, _KEY_AAD), tables)
            else:
                won = await tx.execute("UPDATE access_seal SET tables = ? WHERE id = 1 AND tables = ?",
                                       tables, row["tables"] or "")
            if won == 1:
                for table in missing:
                    rows = await tx.fetchall(f"SELECT {columns(table)} FROM {table} WHERE seal IS NULL")
                    for r in rows:
                        await tx.execute(f"UPDATE {table} SET seal = ? WHERE {_where_pk(table)} AND seal IS NULL",
                                         _mac(key, table, r), *_pk_of(table, r))
                    counts[table] = len(rows)
        if won != 1:
            return await self._load()           # another process sealed them: read what it made
        log.info("access_rows_sealed", **counts)
        if self.audit is not None:
            await self.audit.event(SEALED_EVENT, actor="system", detail={"rows": counts})
        return key

    async def _recorded(self) -> set[str]:
        """The tables an `access.sealed` audit record says were sealed."""
        out: set[str] = set()
        for r in await self.db.fetchall("SELECT detail FROM audit_log WHERE action = ?", SEALED_EVENT):
            try:
                out.update(json.loads(r["detail"]).get("rows", {}))
            except (ValueError, AttributeError):
                out.update(FIELDS)             # unreadable: assume it covered everything (fail closed)
        return out

    def _open(self, blob) -> bytes:
        return self.barrier.open(bytes(blob), _KEY_AAD)

    # ----------------------------------------------------------------- checks
    async def valid(self, table: str, row: Mapping[str, Any]) -> bool:
        """True when `row` (with every column of FIELDS[table] and `seal`) is as the key server wrote it."""
        expected = _mac(await self.key(), table, row)
        if hmac.compare_digest(expected, row.get("seal") or ""):
            return True
        pk = _pk_of(table, row)
        log.warning("access_row_seal_mismatch", table=table, row_id=pk[0] if len(pk) == 1 else "/".join(map(str, pk)))
        if self.metrics is not None:
            self.metrics.seal_failures.labels(table).inc()
        return False

    # ----------------------------------------------------------------- writes
    async def mac(self, table: str, values: Mapping[str, Any]) -> str:
        """The seal of a row holding `values` (every column of FIELDS[table]), for a bulk INSERT."""
        return _mac(await self.key(), table, values)

    async def insert(self, db, table: str, values: dict[str, Any]) -> None:
        """INSERT a row whose id the caller chose, sealed."""
        await insert_row(db, table, {**values, "seal": await self.mac(table, values)})

    async def reseal(self, db, table: str, row_id: Any, before: Mapping[str, Any]) -> None:
        """Seal again a row an UPDATE just changed in place (in the same transaction, which holds its lock),
        if its seal matched the values it had before (`before`: the changed columns' old values); else
        raise, and the transaction rolls the change back."""
        row = await db.fetchone(f"SELECT {columns(table)} FROM {table} WHERE {_where_pk(table)}", row_id)
        if not await self.valid(table, {**row, **before}):
            raise _edited(table, row)
        await db.execute(f"UPDATE {table} SET seal = ? WHERE {_where_pk(table)}", await self.mac(table, row), row_id)

    async def seal_new(self, db, table: str, row_id: int) -> None:
        """Seal a row just inserted with a database-made id (in the same transaction)."""
        row = await db.fetchone(f"SELECT {columns(table)} FROM {table} WHERE id = ?", row_id)
        await db.execute(f"UPDATE {table} SET seal = ? WHERE id = ?", _mac(await self.key(), table, row), row_id)

    async def update(self, db, table: str, where: str, args: tuple, changes: dict[str, Any], *,
                     check: bool = True) -> int:
        """UPDATE the rows matching `where` with `changes` and seal them again; the number changed.

        `check`: each row must pass its seal first (a new seal would otherwise launder an edit). A change
        that only narrows what the row allows (a revocation, a scheduled deletion, a delete) passes
        check=False: it is made on a failing row too, which keeps its failing seal."""
        key = await self.key()
        sets = ", ".join(f"{c} = ?" for c in changes)
        changed = 0
        for r in await db.fetchall(f"SELECT {columns(table)} FROM {table} WHERE {where}", *args):
            ok = await self.valid(table, r)
            if check and not ok:
                raise _edited(table, r)
            # Only the row as read: a change committed meanwhile is not overwritten.
            same = "seal = ?" if r["seal"] is not None else "seal IS NULL"
            changed += await db.execute(f"UPDATE {table} SET {sets}, seal = ? WHERE {_where_pk(table)} AND {same}",
                                        *changes.values(), _mac(key, table, {**r, **changes}) if ok else r["seal"],
                                        *_pk_of(table, r), *((r["seal"],) if r["seal"] is not None else ()))
        return changed


def _edited(table: str, row: Mapping[str, Any]) -> BarrierError:
    ident = "/".join(map(str, _pk_of(table, row)))
    return BarrierError(f"a row of {table} (id {ident}) was changed outside the key server; nothing was changed; "
                        "restore it from a backup (docs/disaster-recovery.md), or delete it and create it again")


async def insert_row(db, table: str, values: dict[str, Any]) -> None:
    """INSERT `values` (column -> value) into `table`."""
    marks = ", ".join("?" * len(values))
    await db.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks})", *values.values())


def install(rt) -> None:
    seal = rt.access_seal
    seal.audit, seal.metrics = rt.audit, rt.metrics
