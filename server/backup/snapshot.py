"""Online backup: one consistent snapshot of the whole store, sent as a backup file (format 3).

The snapshot becomes a SQLite database image in a private scratch directory (server/backup/image.py):
on SQLite a page copy of the live database (SQLite's online backup, one read transaction in WAL mode;
`VACUUM INTO` when the live database does not delete securely), on PostgreSQL the
rows of one REPEATABLE READ READ ONLY transaction (Storage.snapshot) inserted into a fresh image.
The server keeps serving reads and writes meanwhile, and the file holds one consistent moment: the
manifest (counts, audit head, system-key versions) is read from the image itself, or, beside a page
copy, from a second read transaction opened at the same moment as the copy's (`_sqlite_image`).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Awaitable, Callable

from server import timeutil
from server.backup.format import FORMAT_VERSION, Manifest, TableInfo, mac_key
from server.backup.image import (ImageWriter, RowsImage, database_size, page_copy, read_snapshot, scratch_dir,
                                 vacuum_into)
from server.barrier.barrier import Barrier
from server.errors import Sealed
from server.storage.base import Executor, Snapshot, Storage
from server import VERSION
from server.storage.migrations import SEALED_COLUMNS, all_sql

Sink = Callable[[bytes], Awaitable[object]]
Progress = Callable[[int, int], object]        # (records, bytes) so far
BATCH = 5000           # rows fetched from PostgreSQL at a time


def table_order(tables: list[str]) -> list[str]:
    """Restore order: the order migrations create tables in (a table after those it references);
    any table no migration names (none should exist) last, by name."""
    created: list[str] = []
    for text in all_sql():
        m = re.match(r"\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", text, re.I)
        if m and m.group(1) not in created:
            created.append(m.group(1))
    rank = {t: i for i, t in enumerate(created)}
    return sorted(tables, key=lambda t: (rank.get(t, len(rank)), t))


@dataclass
class Summary:
    backup_id: str
    records: int
    bytes: int
    seconds: float
    tables: dict[str, int]
    system_key_versions: list[int]
    audit_head: dict
    schema_version: int
    backend: str

    def to_api(self) -> dict:
        return {"backupId": self.backup_id, "records": self.records, "bytes": self.bytes, "seconds": self.seconds,
                "tables": self.tables, "systemKeyVersions": self.system_key_versions, "auditHead": self.audit_head,
                "schemaVersion": self.schema_version, "backend": self.backend}


async def _image_of_rows(snap: Snapshot, dest: Path) -> None:
    """The snapshot's rows in a fresh image at the snapshot's schema versions (a PostgreSQL source)."""
    versions = [int(r["version"]) for r in await snap.fetchall("SELECT version FROM schema_version ORDER BY version")]
    img = await asyncio.to_thread(RowsImage, dest, versions)
    pending: asyncio.Future | None = None
    try:
        for name in table_order(await snap.tables()):
            cols = [c.name for c in await snap.columns(name)]
            # In key order (B-tree inserts at the right edge); each batch goes into the image (a thread)
            # while the next one is fetched.
            async for rows in snap.stream(f"SELECT {', '.join(cols)} FROM {name} ORDER BY 1", batch=BATCH):
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(img.insert, name, cols, rows))
        if pending is not None:
            await pending
            pending = None
        await asyncio.to_thread(img.finish)
    except BaseException:
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending
        await asyncio.to_thread(img.close)
        raise


def image_manifest(image: Path, barrier: Barrier, backend: str) -> Manifest:
    """The manifest of a finished image (blocking)."""
    con = sqlite3.connect(f"file:{image}?mode=ro", uri=True)
    try:
        return sqlite_manifest(con, barrier, backend, os.path.getsize(image))
    finally:
        con.close()


def sqlite_manifest(con: sqlite3.Connection, barrier: Barrier, backend: str, payload_bytes: int) -> Manifest:
    """The manifest of what `con` sees (an image, or a read snapshot of the live database that an image is
    copied from), read with plain sqlite3: every count and the per-version tally of the sealed blobs in C
    (the storage layer's aiosqlite hops cost more than the reads). Blocking."""
    con.execute(f"PRAGMA mmap_size={1 << 40}")       # pages read in place, not a read() call each
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                       "'sqlite_%' AND name <> 'schema_version' ORDER BY name")]
    tables = []
    for name in table_order(names):
        cols = con.execute("SELECT name, type FROM pragma_table_info(?) ORDER BY cid", (name,)).fetchall()
        count = con.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
        tables.append(TableInfo(name, tuple(c[0] for c in cols), tuple((c[1] or "").upper() == "BLOB"
                                                                        for c in cols), int(count)))
    present = {t.name: t for t in tables}
    versions = [int(r[0]) for r in con.execute("SELECT version FROM schema_version ORDER BY version")]
    by_version: dict[int, int] = {}
    known = sorted(barrier.versions())
    for table, column, _pk in SEALED_COLUMNS:      # as server/barrier/rewrap.py count_by_version
        if table not in present or column not in present[table].columns:
            continue
        for v, n in _tally(con, table, column, known).items():
            by_version[v] = by_version.get(v, 0) + n
    head: dict = {}
    if "audit_head" in present:
        cur = con.execute("SELECT * FROM audit_head WHERE id = 1")
        row = cur.fetchone()
        head = dict(zip((d[0] for d in cur.description), row)) if row else {}
    sequences = {str(n): int(s) for n, s in con.execute("SELECT name, seq FROM sqlite_sequence ORDER BY name")} \
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() else {}
    # The head's identity as stored (seq and link; an epoch too once the audit package keeps one), no key.
    audit_head = {k: v for k, v in head.items()
                  if k != "id" and isinstance(v, (int, str)) and not k.endswith("_sealed")}
    backup_id = uuid.uuid4().hex
    mac_version, _key, check = mac_key(barrier, backup_id)
    return Manifest(backup_id=backup_id, created_at=timeutil.now_db(), backend=backend, schema_versions=versions,
                    tables=tables, sequences=sequences,
                    system_key_versions=sorted(set(by_version) | {mac_version}),
                    records_by_version=dict(sorted(by_version.items())), mac_version=mac_version, key_check=check,
                    audit_head=audit_head, skm_version=VERSION, format_version=FORMAT_VERSION,
                    payload_bytes=payload_bytes, mac_nonce=os.urandom(12).hex())


def _tally(con: sqlite3.Connection, table: str, column: str, known: list[int]) -> dict[int, int]:
    """Records of one sealed column per system-key version (the blob's first 4 bytes). One pass summing
    per version the keyring holds (no sort: half the time of a GROUP BY over 100,000 blobs); a GROUP BY
    only when some record is under another version, so the manifest names it all the same."""
    hdrs = [v.to_bytes(4, "big") for v in known]
    sums = "".join(f", SUM(substr({column}, 1, 4) = ?)" for _ in hdrs)
    row = con.execute(f"SELECT COUNT(*){sums} FROM {table} WHERE {column} IS NOT NULL", hdrs).fetchone()
    out = {v: int(n or 0) for v, n in zip(known, row[1:]) if n}
    if sum(out.values()) == row[0]:
        return out
    out = {}
    for hdr, n in con.execute(f"SELECT substr({column}, 1, 4), COUNT(*) FROM {table} WHERE {column} IS NOT NULL "
                              "GROUP BY 1"):
        if isinstance(hdr, bytes) and len(hdr) == 4:
            v = int.from_bytes(hdr, "big")
            out[v] = out.get(v, 0) + int(n)
    return out


async def _zeroes_deletes(tx: Executor) -> bool:
    """Whether the live SQLite database's own connections zero what they delete (`PRAGMA secure_delete`
    on: what server/storage/sqlite.py sets on every connection, and SQLite's compile-time default on
    Debian), asked of the storage's writing connection itself. Then a page copy of it holds no deleted
    record in a page in use (the freelist is scrubbed in the copy); otherwise the backup rebuilds the file."""
    return int(await tx.fetchval("PRAGMA secure_delete") or 0) in (1, 2)


async def _sqlite_image(storage: Storage, path: str, image: Path, barrier: Barrier) -> Manifest:
    """The live SQLite database's image at `image`, and its manifest. A page copy (when the store deletes
    securely) and the manifest's counts are read side by side, each in a thread, from two read
    transactions opened while this process holds the writer lock: no commit lands between them, so
    both see the same moment. Otherwise `VACUUM INTO`, then the manifest read from the image."""
    pinned: tuple[sqlite3.Connection, sqlite3.Connection] | None = None
    try:
        async with storage.transaction() as tx:
            if await _zeroes_deletes(tx):
                pinned = await asyncio.to_thread(_two_snapshots, path)
    except sqlite3.Error:            # any doubt: the rebuild, which needs no such promise
        for con in pinned or ():
            con.close()
        pinned = None
    if pinned is None:
        await asyncio.to_thread(vacuum_into, path, image)
        return await asyncio.to_thread(image_manifest, image, barrier, "sqlite")
    return await asyncio.to_thread(_copy_and_count, *pinned, image, barrier)


def _copy_and_count(copy_from: sqlite3.Connection, count_from: sqlite3.Connection, image: Path,
                    barrier: Barrier) -> Manifest:
    """The page copy here and the manifest in a second thread, at once; both connections closed after
    both are done (also when the awaiting task was cancelled: this runs to its end). Blocking."""
    from concurrent.futures import ThreadPoolExecutor
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="skm-backup-count") as pool:
            counting = pool.submit(sqlite_manifest, count_from, barrier, "sqlite", 0)
            page_copy(copy_from, image)
            manifest = counting.result()
    finally:
        copy_from.close()
        count_from.close()
    manifest.payload_bytes = os.path.getsize(image)
    return manifest


def _two_snapshots(path: str) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    first = read_snapshot(path)
    try:
        return first, read_snapshot(path)
    except BaseException:
        first.close()
        raise


async def create_backup(storage: Storage, barrier: Barrier, sink: Sink, *, progress: Progress | None = None,
                        on_manifest: Callable[[Manifest], object] | None = None) -> Summary:
    """Write one consistent backup of `storage` to `sink`, a chunk at a time; returns its summary."""
    if barrier.sealed:
        raise Sealed(barrier.sealed_reason)
    t0 = time.monotonic()
    work: Path | None = None
    try:
        if storage.dialect == "sqlite":
            path = storage.path          # type: ignore[attr-defined]
            work = await asyncio.to_thread(lambda: scratch_dir(database_size(path), Path(path).parent))
            image = work / "image.db"
            manifest = await _sqlite_image(storage, path, image, barrier)
            sequences = None
        else:
            async with storage.snapshot() as snap:
                size = int(await snap.fetchval("SELECT pg_database_size(current_database()) AS n") or 0)
                work = await asyncio.to_thread(scratch_dir, size)
                image = work / "image.db"
                await _image_of_rows(snap, image)
                sequences = await snap.sequences()
            manifest = await asyncio.to_thread(image_manifest, image, barrier, storage.dialect)
        if sequences is not None:
            manifest.sequences = sequences
        if on_manifest is not None:
            on_manifest(manifest)
        _v, key, _c = mac_key(barrier, manifest.backup_id, manifest.mac_version, manifest.mac_purpose)
        w = ImageWriter(manifest, key)
        await sink(w.header())
        f = await asyncio.to_thread(open, image, "rb")
        # Pipelined: the next chunk is read and MAC'd (a thread; hashlib and file reads release the GIL)
        # while this one is encrypted and sent on the event loop, in the same order.
        pending = asyncio.ensure_future(asyncio.to_thread(w.read_payload, f))
        try:
            while data := await pending:
                pending = asyncio.ensure_future(asyncio.to_thread(w.read_payload, f))
                await sink(data)
                if progress is not None:
                    progress(manifest.total_records * w.payload_bytes // max(manifest.payload_bytes, 1), w.bytes)
        finally:
            if not pending.done():
                with contextlib.suppress(BaseException):
                    await pending
            f.close()
        await sink(w.trailer())
    finally:
        if work is not None:
            await asyncio.to_thread(shutil.rmtree, work, True)
    if progress is not None:
        progress(manifest.total_records, w.bytes)
    return Summary(manifest.backup_id, manifest.total_records, w.bytes, round(time.monotonic() - t0, 3),
                   {t.name: t.count for t in manifest.tables}, manifest.system_key_versions, manifest.audit_head,
                   max(manifest.schema_versions, default=0), manifest.backend)
