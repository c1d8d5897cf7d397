"""Bulk load into PostgreSQL for a restore, the way pg_restore does it: the tables' keys, unique
constraints, foreign keys and indexes are dropped before the COPY and made again after it, inside
the restore's one transaction (DDL is transactional: a refused restore rolls them back too).

Why: an index built once over loaded rows is a sort, one updated per row is a random B-tree insert;
a foreign key added over loaded rows is one join, one in place is a trigger and a lookup per row.
At 100,000 keys that is most of a restore's time. Definitions are read back from the catalog
(pg_get_constraintdef / pg_get_indexdef), so what is made again is exactly what was there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from server.storage.base import Executor


@dataclass
class Dropped:
    keys: list[tuple[str, str, str]] = field(default_factory=list)          # (table, name, def): PK / UNIQUE
    indexes: list[str] = field(default_factory=list)                         # CREATE INDEX statements
    foreign: list[tuple[str, str, str]] = field(default_factory=list)        # (table, name, def): FOREIGN KEY


async def drop_for_load(tx: Executor, tables: Sequence[str]) -> Dropped:
    """Drop the keys, indexes and foreign keys of `tables` (this schema); returns how to make them again."""
    out = Dropped()
    rows = await tx.fetchall(
        "SELECT quote_ident(r.relname) AS t, quote_ident(c.conname) AS name, c.contype::text AS kind, "
        "pg_get_constraintdef(c.oid) AS def FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
        "WHERE r.relnamespace = current_schema()::regnamespace AND r.relname = ANY(?) "
        "AND c.contype IN ('p', 'u', 'f') ORDER BY r.relname, c.conname", list(tables))
    for r in rows:
        (out.foreign if r["kind"] == "f" else out.keys).append((r["t"], r["name"], r["def"]))
    idx = await tx.fetchall(
        "SELECT quote_ident(ic.relname) AS name, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
        "JOIN pg_class r ON r.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid "
        "WHERE r.relnamespace = current_schema()::regnamespace AND r.relname = ANY(?) AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x')) "
        "ORDER BY ic.relname", list(tables))
    for table, name, _def in out.foreign:
        await tx.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    for table, name, _def in out.keys:
        await tx.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    for r in idx:
        await tx.execute(f"DROP INDEX {r['name']}")
        out.indexes.append(r["def"])
    return out


async def restore_after_load(tx: Executor, dropped: Dropped) -> None:
    """Make again what `drop_for_load` dropped: keys first (foreign keys need them), then indexes,
    then the foreign keys, each checked over the loaded rows (a violation fails the restore)."""
    await tx.execute("SET LOCAL maintenance_work_mem = '256MB'")
    for table, name, definition in dropped.keys:
        await tx.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    for statement in dropped.indexes:
        await tx.execute(statement)
    for table, name, definition in dropped.foreign:
        await tx.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
