"""What every part of the key service shares: storage, the barrier, the event bus, limits, caches.

The parts (stores, lookup, lifecycle, crypto, access tracking) each hold this one object rather
than each other's internals, so a write in one part drops the rows another part cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.access.seal import AccessSeal
from server.barrier.barrier import Barrier
from server.errors import Conflict
from server.events import Event, EventBus
from server.keys.caches import MaterialCache, MetaCache
from server.storage.base import Storage


@dataclass(frozen=True)
class Limits:
    min_auto_rotation_days: int = 30
    deletion_grace_days: int = 7
    material_cache_entries: int = 4096
    meta_cache_entries: int = 20000
    meta_cache_max_age: float = 5.0


class KeyContext:
    def __init__(self, storage: Storage, barrier: Barrier, events: EventBus, limits: Limits,
                 seal: AccessSeal) -> None:
        self.db = storage
        self.barrier = barrier
        self.events = events
        self.limits = limits
        self.seal = seal              # key stores and keys are sealed rows, like operators
        self.material = MaterialCache(limits.material_cache_entries)
        self.meta = MetaCache(events, limits.meta_cache_entries, limits.meta_cache_max_age)

    async def publish(self, event: Event) -> None:
        # Drop our own cached rows first: with a replication relay the bus hears the event
        # only once it has gone round, and the writer must not read its old row meanwhile.
        if event.key_id:
            self.meta.drop_key(event.key_id)
        self.meta.drop_store(event.keystore_id)
        await self.events.publish(event)

    async def insert_returning(self, sql: str, *args: Any, conflict: str, sealed: str | None = None) -> dict:
        """INSERT ... RETURNING id; `sealed`: the table, whose new row is sealed in the same transaction."""
        if sealed:
            await self.seal.key()      # first: loading it may seal rows in a transaction of its own
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchone(sql, *args)
                if sealed:
                    await self.seal.seal_new(tx, sealed, row["id"])
                return row
        except Exception as e:
            if is_unique_violation(e):
                raise Conflict(conflict) from None
            raise


def is_unique_violation(e: Exception) -> bool:
    name = type(e).__name__
    return "UniqueViolation" in name or (name == "IntegrityError" and "UNIQUE" in str(e))
