"""Online re-encryption of every sealed record under the current system-key version.

Walks SEALED_COLUMNS in primary-key order, one batch per transaction. Inside the
transaction each row is re-read and updated only if its blob is still the one
read (compare-and-set), so concurrent writers win and nothing is lost. Readers
keep working: the barrier holds the old and the new version throughout.
"""
from __future__ import annotations

import struct
from typing import Awaitable, Callable, Sequence

from server.barrier.barrier import Barrier, sealed_aad
from server.errors import BarrierError, Sealed
from server.storage.base import Executor, Storage
from server.storage.migrations import SEALED_COLUMNS

Progress = Callable[[int, int], object | Awaitable[object]]
AadFor = Callable[[str, str, Sequence[object]], bytes]


def default_aad(table: str, column: str, pk: Sequence[object]) -> bytes:
    """The AAD writers use: sealed_aad(table, column, *primary key)."""
    return sealed_aad(table, column, *pk)


def _header(version: int) -> bytes:
    return struct.pack(">I", version)


async def count_by_version(storage: Storage | Executor,
                           columns: Sequence[tuple[str, str, tuple[str, ...]]] | None = None) -> dict[int, int]:
    """Records per system-key version over every sealed column (NULLs not counted)."""
    out: dict[int, int] = {}
    for table, column, _pk in columns or SEALED_COLUMNS:
        rows = await storage.fetchall(
            f"SELECT substr({column}, 1, 4) AS v, COUNT(*) AS n FROM {table} "
            f"WHERE {column} IS NOT NULL GROUP BY substr({column}, 1, 4)")
        for r in rows:
            hdr = bytes(r["v"])
            if len(hdr) == 4:
                v = struct.unpack(">I", hdr)[0]
                out[v] = out.get(v, 0) + int(r["n"])
    return dict(sorted(out.items()))


async def _call(progress: Progress | None, done: int, total: int) -> None:
    if progress is None:
        return
    res = progress(done, total)
    if hasattr(res, "__await__"):
        await res  # type: ignore[misc]


async def rewrap(storage: Storage, barrier: Barrier, *, batch: int = 200, progress: Progress | None = None,
                 aad: AadFor = default_aad,
                 columns: Sequence[tuple[str, str, tuple[str, ...]]] | None = None) -> int:
    """Re-seal every record not on barrier.current_version; returns how many were re-sealed.

    `progress(done, total)` (sync or async) runs after each batch; `total` is the count
    of records on other versions at the start (rows written meanwhile are already current).
    """
    if barrier.sealed:
        raise Sealed(barrier.sealed_reason)
    if batch < 1:
        raise ValueError("batch must be at least 1")
    columns = list(columns or SEALED_COLUMNS)
    target = barrier.current_version
    counts = await count_by_version(storage, columns)
    total = sum(n for v, n in counts.items() if v != target)
    done = 0
    await _call(progress, done, total)
    for table, column, pk in columns:
        cols = ", ".join(pk)
        last: tuple | None = None
        while True:
            target = barrier.current_version
            if target is None:
                raise Sealed(barrier.sealed_reason)
            changed, last, more = await _rewrap_batch(storage, barrier, table, column, pk, cols, last,
                                                      _header(target), batch, aad)
            done += changed
            await _call(progress, done, max(total, done))
            if not more:
                break
    return done


async def _rewrap_batch(storage: Storage, barrier: Barrier, table: str, column: str, pk: tuple[str, ...],
                        cols: str, last: tuple | None, target_hdr: bytes, batch: int, aad: AadFor,
                        ) -> tuple[int, tuple | None, bool]:
    """One transaction: the next `batch` rows after `last` not on the target version."""
    after = f"({cols}) > ({', '.join('?' * len(pk))}) AND " if last is not None else ""
    where_pk = " AND ".join(f"{c} = ?" for c in pk)
    changed = 0
    async with storage.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT {cols}, {column} AS blob FROM {table} "
            f"WHERE {after}{column} IS NOT NULL AND substr({column}, 1, 4) <> ? "
            f"ORDER BY {cols} LIMIT ?",
            *(last or ()), target_hdr, batch)
        for r in rows:
            ident = [r[c] for c in pk]
            old = bytes(r["blob"])
            a = aad(table, column, ident)
            try:
                plain = barrier.open(old, a)
            except BarrierError as e:
                raise BarrierError(f"{table}.{column} record ({', '.join(map(str, ident))}): {e.detail}") from None
            new = barrier.seal(plain, a)
            del plain
            # Compare-and-set: a writer that changed the row since the read keeps its value.
            changed += await tx.execute(f"UPDATE {table} SET {column} = ? WHERE {where_pk} AND {column} = ?",
                                        new, *ident, old)
    new_last = tuple(rows[-1][c] for c in pk) if rows else last
    return changed, new_last, len(rows) == batch
