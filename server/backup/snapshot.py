"""Online backup: one read snapshot of the whole store, streamed out as a backup file.

Reads through the storage interface (Storage.snapshot: a deferred read transaction on SQLite in
WAL mode, REPEATABLE READ READ ONLY on PostgreSQL), so the server keeps serving reads and
writes while it runs and the file holds one consistent moment: every table, the audit head and
the sequences as of the snapshot's start.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

from server import timeutil
from server.backup.format import Manifest, TableInfo, Writer, mac_key
from server.barrier.barrier import Barrier
from server.barrier.rewrap import count_by_version
from server.errors import Sealed
from server.storage.base import Snapshot, Storage
from server import VERSION
from server.storage.migrations import SEALED_COLUMNS, all_sql

Sink = Callable[[bytes], Awaitable[object]]
Progress = Callable[[int, int], object]        # (records, bytes) so far
BATCH = 1000
SLICE = 100            # rows encoded between two yields to the event loop
CHUNK = 256 * 1024     # bytes handed to the sink at a time


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


async def _manifest(snap: Snapshot, barrier: Barrier, backend: str) -> Manifest:
    tables = []
    for name in table_order(await snap.tables()):
        cols = await snap.columns(name)
        count = int(await snap.fetchval(f"SELECT COUNT(*) AS n FROM {name}") or 0)
        tables.append(TableInfo(name, tuple(c.name for c in cols), tuple(c.blob for c in cols), count))
    present = {t.name for t in tables}
    versions = [int(r["version"]) for r in await snap.fetchall("SELECT version FROM schema_version ORDER BY version")]
    by_version = await count_by_version(snap, [c for c in SEALED_COLUMNS if c[0] in present])
    head = await snap.fetchone("SELECT * FROM audit_head WHERE id = 1") if "audit_head" in present else None
    # The head's identity as stored (seq and link; an epoch too once the audit package keeps one), no key.
    audit_head = {k: v for k, v in (head or {}).items()
                  if k != "id" and isinstance(v, (int, str)) and not k.endswith("_sealed")}
    backup_id = uuid.uuid4().hex
    mac_version, _key, check = mac_key(barrier, backup_id)
    return Manifest(backup_id=backup_id, created_at=timeutil.now_db(), backend=backend, schema_versions=versions,
                    tables=tables, sequences=await snap.sequences(),
                    system_key_versions=sorted(set(by_version) | {mac_version}), records_by_version=by_version,
                    mac_version=mac_version, key_check=check, audit_head=audit_head, skm_version=VERSION)


async def create_backup(storage: Storage, barrier: Barrier, sink: Sink, *, progress: Progress | None = None,
                        on_manifest: Callable[[Manifest], object] | None = None) -> Summary:
    """Write one consistent backup of `storage` to `sink`, a chunk at a time; returns its summary."""
    if barrier.sealed:
        raise Sealed(barrier.sealed_reason)
    t0 = time.monotonic()
    async with storage.snapshot() as snap:
        manifest = await _manifest(snap, barrier, storage.dialect)
        if on_manifest is not None:
            on_manifest(manifest)
        _v, key, _c = mac_key(barrier, manifest.backup_id, manifest.mac_version)
        w = Writer(manifest, key)
        await sink(w.header())
        out: list[bytes] = []
        pending = 0
        for index, t in enumerate(manifest.tables):
            if not t.count:
                continue
            cols = ", ".join(t.columns)
            async for rows in snap.stream(f"SELECT {cols} FROM {t.name} ORDER BY 1", batch=BATCH):
                # Encoded in slices of about a millisecond on the loop, yielding between them: requests
                # interleave with the backup. (A thread would hold the GIL for up to the 5 ms switch
                # interval each time a request wants it back: worse tail latency for the same work.)
                for i in range(0, len(rows), SLICE):
                    data = w.rows(index, rows[i:i + SLICE])
                    out.append(data)
                    pending += len(data)
                    if pending >= CHUNK:          # few, large writes to the stream or file
                        await sink(b"".join(out))
                        out, pending = [], 0
                    await asyncio.sleep(0)
                if progress is not None:
                    progress(w.records, w.bytes)
        out.append(w.trailer())
        await sink(b"".join(out))
    if progress is not None:
        progress(w.records, w.bytes)
    return Summary(manifest.backup_id, w.records, w.bytes, round(time.monotonic() - t0, 3),
                   {t.name: t.count for t in manifest.tables}, manifest.system_key_versions, manifest.audit_head,
                   max(manifest.schema_versions, default=0), manifest.backend)
