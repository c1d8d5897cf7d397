"""Verify a backup file, and restore one into an empty store on either backend.

Restore runs offline on the target host with the installation's system key (server/backup/keys.py)
and reads the file twice: the first pass checks everything (structure, manifest, the MAC over the
whole file, and that sealed records open under the system key) before anything is created; the
second writes every row, exactly as stored, in ONE transaction that re-checks the MAC, the counts
and the audit chain before it commits. A refused file or target leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from server import logs
from server.backup.format import InvalidBackup, Manifest, Reader
from server.barrier.barrier import Barrier, sealed_aad
from server.errors import BarrierError, ConfigError, Conflict
from server.storage.base import Executor, Storage, open_storage
from server.storage.migrations import MIGRATIONS, SEALED_COLUMNS, all_sql

log = logs.get("skm.backup")
Progress = Callable[[str, int, int], object]      # (phase, records done, records total)
SAMPLE_PER_COLUMN = 32


@dataclass
class VerifyReport:
    manifest: Manifest
    records: int
    bytes: int
    unsealed: dict[str, int] = field(default_factory=dict)    # "table.column" -> records opened

    def to_api(self) -> dict:
        m = self.manifest
        return {"ok": True, "backupId": m.backup_id, "createdAt": m.created_at, "backend": m.backend,
                "schemaVersion": max(m.schema_versions, default=0), "records": self.records, "bytes": self.bytes,
                "tables": {t.name: t.count for t in m.tables}, "systemKeyVersions": m.system_key_versions,
                "macSystemKeyVersion": m.mac_version, "auditHead": m.audit_head, "unsealedSample": self.unsealed}


async def _open_reader(path: Path, barrier: Barrier) -> tuple[Any, Reader]:
    try:
        f = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        raise InvalidBackup(f"{path} does not exist") from None
    except (IsADirectoryError, PermissionError) as e:
        raise InvalidBackup(f"cannot read {path}: {e.strerror}") from None
    try:
        return f, await asyncio.to_thread(Reader, f, barrier)
    except BaseException:
        f.close()
        raise


async def verify_file(path: str | Path, barrier: Barrier, *, progress: Progress | None = None,
                      sample: int = SAMPLE_PER_COLUMN, full: bool = True) -> VerifyReport:
    """Everything short of writing: structure, manifest, MAC, and a sample of sealed records opened.

    `full` parses every row too (`skm backup verify`); without it only the sampled rows are parsed
    (restore's first pass: its second pass parses every row inside a transaction that commits only
    if they all check out)."""
    f, reader = await _open_reader(Path(path), barrier)
    try:
        m = reader.manifest
        sealed = _sealed_positions(m)
        wanted = {m.tables.index(next(t for t in m.tables if t.name == table)) for table, _c in sealed}
        picked: dict[int, list[tuple[int, bytes]]] = {i: [] for i in wanted}
        seen = dict.fromkeys(wanted, 0)
        rng = random.Random()
        total = m.total_records

        def scan() -> None:
            step = 0
            rows = reader.batches(4096) if full else None
            if rows is not None:
                for batch in rows:
                    if batch.index in wanted:
                        for row in batch.rows:
                            _reservoir(picked[batch.index], seen, batch.index, (0, row), sample, rng)
                    step += len(batch.rows)
                    if progress is not None and step >= 20000:
                        step = 0
                        progress("verify", reader.records, total)
                return
            for index, lineno, line in reader.scan():
                if index in wanted:
                    _reservoir(picked[index], seen, index, (lineno, line), sample, rng)
                step += 1
                if progress is not None and step >= 20000:
                    step = 0
                    progress("verify", reader.records, total)

        await asyncio.to_thread(scan)
        reader.finish()
        if progress is not None:
            progress("verify", reader.records, total)
        unsealed: dict[str, int] = {}
        for (table, column), (ci, pki) in sealed.items():
            index = [t.name for t in m.tables].index(table)
            for lineno, item in picked[index]:
                row = item if full else reader.parse_row(item, lineno)[1]
                blob = row[ci]
                if blob is None:
                    continue
                pk = [row[i] for i in pki]
                try:
                    barrier.open(blob, sealed_aad(table, column, *pk))
                except BarrierError as e:
                    raise InvalidBackup(f"{table}.{column} record ({', '.join(map(str, pk))}) does not open under "
                                        f"the system key: {e.detail}") from None
                unsealed[f"{table}.{column}"] = unsealed.get(f"{table}.{column}", 0) + 1
        return VerifyReport(m, reader.records, reader.bytes, unsealed)
    finally:
        f.close()


def _reservoir(bucket: list, seen: dict[int, int], index: int, item: Any, size: int, rng: random.Random) -> None:
    """Keep a uniform sample of `size` items of table `index` (any row may be the one picked)."""
    seen[index] += 1
    if len(bucket) < size:
        bucket.append(item)
    else:
        j = rng.randrange(seen[index])
        if j < size:
            bucket[j] = item


def _sealed_positions(m: Manifest) -> dict[tuple[str, str], tuple[int, list[int]]]:
    """Per sealed column this program knows: (column index, primary-key indexes) in the backup's rows."""
    out = {}
    tables = {t.name: t for t in m.tables}
    for table, column, pk in SEALED_COLUMNS:
        t = tables.get(table)
        if t is None or column not in t.columns or not all(c in t.columns for c in pk):
            continue
        out[(table, column)] = (t.columns.index(column), [t.columns.index(c) for c in pk])
    return out


# ----------------------------------------------------------------------------- restore
@dataclass
class RestoreReport:
    verify: VerifyReport
    target: str
    records: int
    audit: dict
    epoch: str                 # what happened about the new audit epoch
    seconds: float = 0.0

    def to_api(self) -> dict:
        return {"ok": True, "target": self.target, "records": self.records, "backupId": self.verify.manifest.backup_id,
                "tables": {t.name: t.count for t in self.verify.manifest.tables}, "audit": self.audit,
                "auditEpoch": self.epoch, "seconds": self.seconds}


def _seeded_tables() -> set[str]:
    """Tables a migration fills with a row of its own (audit_head's id 1): present in an empty store."""
    out = set()
    for text in all_sql():
        m = re.match(r"\s*INSERT\s+INTO\s+(\w+)", text, re.I)
        if m:
            out.add(m.group(1))
    return out


async def _existing_data(db: Executor, tables: list[str]) -> dict[str, int]:
    """Rows per table that make a store non-empty (a migration's own seed rows do not)."""
    seeded = _seeded_tables()
    out = {}
    for t in tables:
        if t in seeded:
            continue
        n = int(await db.fetchval(f"SELECT COUNT(*) AS n FROM {t}") or 0)
        if n:
            out[t] = n
    if "audit_head" in tables and int(await db.fetchval("SELECT COALESCE(MAX(seq), 0) AS n FROM audit_head") or 0):
        out.setdefault("audit_log", 0)
    return out


def describe_target(url: str) -> str:
    """A storage URL as it may be printed: no password."""
    if url.startswith("sqlite:///"):
        return url
    from urllib.parse import urlsplit, urlunsplit
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = (f"{p.username}@" if p.username else "") + host + (f":{p.port}" if p.port else "")
    return urlunsplit(p._replace(netloc=netloc, query=""))


async def _target_tables(storage: Storage) -> list[str]:
    async with storage.snapshot() as snap:
        return await snap.tables()


async def verify_audit(db: Executor, barrier: Barrier) -> dict:
    """The restored chain: every digest and keyed tag (the checkpoints are checked by the next
    `skm audit verify`, once the restore checkpoint has announced the new epoch)."""
    from server.audit import verify_chain
    from server.audit.log import read_link_key
    result = await verify_chain(db, key=await read_link_key(db, barrier))
    return result.to_api()


async def _start_epoch(storage: Storage, barrier: Barrier, restored_from: dict) -> str:
    """Seal a new audit epoch so the next start signs a `restore` checkpoint (server/audit/checkpoints.py)."""
    from server.audit.checkpoints import start_restored_epoch
    await start_restored_epoch(storage, barrier, restored_from=restored_from)
    return "started: the next server start signs a restore checkpoint"


async def restore(path: str | Path, barrier: Barrier, target_url: str, *, force: bool = False,
                  progress: Progress | None = None) -> RestoreReport:
    """Restore the backup at `path` into the store at `target_url` (empty, or any with `force`)."""
    import time
    t0 = time.monotonic()
    path = Path(path)
    report = await verify_file(path, barrier, progress=progress, full=False)
    m = report.manifest
    known = {v for v, _ in MIGRATIONS}
    newer = sorted(set(m.schema_versions) - known)
    if newer:
        raise InvalidBackup(f"the backup was made at schema version(s) {', '.join(map(str, newer))}, which this skm "
                            "does not know: restore it with the skm release that made it (or newer)")
    if target_url.startswith("sqlite:///"):
        Path(target_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    storage = open_storage(target_url)
    # Exactly the backup's schema first: its rows fit; the migrations it predates run after the rows are in.
    storage.migrations = [mig for mig in MIGRATIONS if mig[0] in set(m.schema_versions)]
    shown = describe_target(target_url)
    await _open_target(storage, shown)
    try:
        extra = sorted(set(await storage.schema_versions()) - set(m.schema_versions))
        if extra:
            raise Conflict(f"{shown} was created by a newer schema (version(s) {', '.join(map(str, extra))}) than "
                           "the backup's: restore into a new, empty database (or data dir)")
        present = await _target_tables(storage)
        missing = [t.name for t in m.tables if t.name not in present]
        if missing:
            raise InvalidBackup(f"the backup has table(s) {', '.join(missing)} that its schema versions do not "
                                "create here: the manifest does not match its rows")
        data = await _existing_data(storage, [t.name for t in m.tables])
        if data and not force:
            what = ", ".join(f"{t} ({n} rows)" if n else t for t, n in sorted(data.items()))
            raise Conflict(f"{shown} is not empty ({what}): restore only into an empty store, or pass --force to "
                           "replace everything in it")
        audit = await _write(storage, barrier, path, m, progress)
        restored_from = {"backupId": m.backup_id, "createdAt": m.created_at, "backend": m.backend,
                         "auditHead": m.audit_head, "file": path.name}
        epoch = await _start_epoch(storage, barrier, restored_from)
    finally:
        await storage.close()
    # Now the migrations newer than the backup (if any) run over the restored rows, as an upgrade would.
    if set(m.schema_versions) != known:
        storage = open_storage(target_url)
        await storage.open()
        await storage.close()
    log.info("backup_restored", backup_id=m.backup_id, records=report.records, target=shown)
    return RestoreReport(report, shown, report.records, audit, epoch, round(time.monotonic() - t0, 3))


async def _open_target(storage: Storage, shown: str) -> None:
    try:
        await storage.open()
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"cannot open the target {shown}: {e.strerror or type(e).__name__}") from None
    except Exception as e:
        import asyncpg
        if isinstance(e, asyncpg.PostgresError):     # e.g. the database does not exist: its own words say so
            raise ConfigError(f"cannot open the target {shown}: {e}") from None
        raise


async def _write(storage: Storage, barrier: Barrier, path: Path, m: Manifest, progress: Progress | None) -> dict:
    """The one transaction: clear, insert every row, re-check MAC, counts and audit chain, then commit."""
    f, reader = await _open_reader(path, barrier)
    try:
        async with storage.transaction() as tx:
            for t in reversed(m.tables):
                await tx.execute(f"DELETE FROM {t.name}")
            # Pipelined: the next batch is read and parsed (a thread) while this one is inserted.
            it = reader.batches(2000)
            pending = asyncio.ensure_future(asyncio.to_thread(next, it, None))
            try:
                while (batch := await pending) is not None:
                    pending = asyncio.ensure_future(asyncio.to_thread(next, it, None))
                    await tx.insert_rows(batch.table.name, batch.table.columns, batch.rows)
                    if progress is not None:
                        progress("restore", reader.records, m.total_records)
            finally:
                if not pending.done():
                    with contextlib.suppress(BaseException):
                        await pending
            # The file may have changed since the first pass: only a second clean MAC commits.
            reader.finish()
            for t in m.tables:
                n = int(await tx.fetchval(f"SELECT COUNT(*) AS n FROM {t.name}") or 0)
                if n != t.count:
                    raise InvalidBackup(f"table {t.name}: {n} rows restored, the backup lists {t.count}")
            await storage.set_sequences(tx, m.sequences)
            audit = await verify_audit(tx, barrier)
            if not audit.get("ok"):
                raise InvalidBackup(f"the backup's audit chain does not verify (record {audit.get('brokenSeq')}: "
                                    f"{audit.get('reason')}); nothing was restored")
        return audit
    finally:
        f.close()
