"""Verify a backup file, and restore one into an empty store on either backend.

Restore runs offline on the target host with the installation's system key (server/backup/keys.py).
A format 2 or 3 file (a SQLite image, server/backup/image.py) is read once: its image is copied to a
private scratch file while the MAC over the whole file is computed, and nothing else happens unless
the MAC checks. Then the image's schema, tables and counts are compared with the manifest and a
sample of sealed records is opened under the system key. Into SQLite the image itself becomes the
store: sequences, the audit chain check and the new audit epoch are done on the scratch file, which
is renamed over the target only when all of them passed. Into PostgreSQL its rows are COPYed in ONE
transaction that checks counts and the audit chain before it commits. A refused file or target
leaves nothing behind. Format 1 files (JSON lines) are still restored as they always were.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from server.backup.format import InvalidBackup, Manifest, Reader, read_manifest
from server.backup.image import extract, scratch_dir
from server.barrier.barrier import Barrier, sealed_aad
from server.errors import BarrierError, ConfigError, Conflict
from server.storage.base import Executor, Storage
from server.storage.factory import open_storage
from server.storage.migrations import MIGRATIONS, SEALED_COLUMNS, all_sql

Progress = Callable[[str, int, int], object]      # (phase, records done, records total)
SAMPLE_PER_COLUMN = 32


@dataclass
class VerifyReport:
    manifest: Manifest
    records: int
    bytes: int
    unsealed: dict[str, int] = field(default_factory=dict)    # "table.column" -> records opened
    image: Path | None = None                                  # formats 2 and 3: the verified image (scratch)

    def to_api(self) -> dict:
        m = self.manifest
        return {"ok": True, "backupId": m.backup_id, "createdAt": m.created_at, "backend": m.backend,
                "schemaVersion": max(m.schema_versions, default=0), "records": self.records, "bytes": self.bytes,
                "tables": {t.name: t.count for t in m.tables}, "systemKeyVersions": m.system_key_versions,
                "macSystemKeyVersion": m.mac_version, "macAlgorithm": m.mac_algorithm, "auditHead": m.audit_head, "unsealedSample": self.unsealed,
                "formatVersion": m.format_version}


async def _open_file(path: Path):
    """The backup file opened for reading, or InvalidBackup saying why it cannot be."""
    try:
        return await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        raise InvalidBackup(f"{path} does not exist") from None
    except (IsADirectoryError, PermissionError) as e:
        raise InvalidBackup(f"cannot read {path}: {e.strerror}") from None


async def _open_reader(path: Path, barrier: Barrier) -> tuple[Any, Reader]:
    f = await _open_file(path)
    try:
        return f, await asyncio.to_thread(Reader, f, barrier)
    except BaseException:
        f.close()
        raise


async def _format_version(path: Path, barrier: Barrier) -> int:
    """The file's format version, its manifest checked (a readable version, this installation's key)."""
    f = await _open_file(path)
    try:
        _first, m, _key = await asyncio.to_thread(read_manifest, f, barrier)
    finally:
        f.close()
    return m.format_version


async def verify_file(path: str | Path, barrier: Barrier, *, progress: Progress | None = None,
                      sample: int = SAMPLE_PER_COLUMN, full: bool = True) -> VerifyReport:
    """Everything short of writing: structure, manifest, MAC, and a sample of sealed records opened."""
    path = Path(path)
    if await _format_version(path, barrier) == 1:
        return await _verify_v1(path, barrier, progress=progress, sample=sample, full=full)
    work = await asyncio.to_thread(lambda: scratch_dir(path.stat().st_size))
    try:
        return await _verify_v2(path, barrier, work, progress=progress, sample=sample)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _verify_v2(path: Path, barrier: Barrier, work: Path, *, progress: Progress | None = None,
                     sample: int = SAMPLE_PER_COLUMN) -> VerifyReport:
    """Format 2: the image copied to `work` under the MAC, then compared with the manifest and sampled."""
    image = work / "skm.db"

    def read() -> tuple[Manifest, int]:
        with open(path, "rb") as f:
            first, m, key = read_manifest(f, barrier)
            size = extract(f, first, m, key, image,
                           None if progress is None else lambda done, total: progress("read", done, total))
            return m, size

    m, size = await asyncio.to_thread(read)
    picked = await asyncio.to_thread(_inspect_image, image, m, sample)
    unsealed: dict[str, int] = {}
    for (table, column), rows in picked.items():
        for *pk, blob in rows:
            _open_sample(barrier, table, column, pk, blob, unsealed)
    return VerifyReport(m, m.total_records, size, unsealed, image)


def _open_sample(barrier: Barrier, table: str, column: str, pk: list, blob: bytes, unsealed: dict[str, int]) -> None:
    """Open one sampled sealed record (proof the backup is usable with this system key) and count it."""
    try:
        barrier.open(blob, sealed_aad(table, column, *pk))
    except BarrierError as e:
        raise InvalidBackup(f"{table}.{column} record ({', '.join(map(str, pk))}) does not open under "
                            f"the system key: {e.detail}") from None
    unsealed[f"{table}.{column}"] = unsealed.get(f"{table}.{column}", 0) + 1


def _inspect_image(image: Path, m: Manifest, sample: int) -> dict[tuple[str, str], list[tuple]]:
    """The (MAC-verified) image against its manifest: schema versions, tables, columns, counts; and a
    random sample of each sealed column's records (primary key..., blob)."""
    con = sqlite3.connect(f"file:{image}?mode=ro", uri=True)
    try:
        versions = [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")]
        if versions != sorted(m.schema_versions):
            raise InvalidBackup("the database image's schema versions do not match its manifest's")
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                           "'sqlite_%' AND name <> 'schema_version'")}
        if names != {t.name for t in m.tables}:
            raise InvalidBackup("the database image's tables do not match its manifest's")
        for t in m.tables:
            cols = tuple(r[1] for r in con.execute(f"PRAGMA table_info({t.name})"))
            n = con.execute(f"SELECT COUNT(*) FROM {t.name}").fetchone()[0]
            if cols != t.columns or n != t.count:
                raise InvalidBackup(f"table {t.name}: the manifest lists {t.count} rows of {len(t.columns)} columns, "
                                    f"the database image holds {n} of {len(cols)}")
        picked: dict[tuple[str, str], list[tuple]] = {}
        tables = {t.name: t for t in m.tables}
        for table, column, pk in SEALED_COLUMNS:
            t = tables.get(table)
            if t is None or column not in t.columns or not all(c in t.columns for c in pk):
                continue
            picked[(table, column)] = _sample_rows(con, table, column, pk, sample)
        return picked
    except sqlite3.DatabaseError as e:
        raise InvalidBackup(f"the database image does not open as a store: {e}") from None
    finally:
        con.close()


def _sample_rows(con: sqlite3.Connection, table: str, column: str, pk: tuple[str, ...], sample: int) -> list[tuple]:
    """Up to `sample` rows of `table` (primary key..., sealed column), any row as likely as another
    (random rowids, each to the next row that has the column). An index seek each: an ORDER BY random()
    read and sorted the whole table (20 ms at 100,000 keys, a sixth of a restore's own work)."""
    # Two statements: SQLite seeks for a lone MIN() or MAX(), but scans the table for both in one.
    lo = con.execute(f"SELECT MIN(rowid) FROM {table}").fetchone()[0]
    hi = con.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0]
    if lo is None or hi is None:
        return []
    sql = (f"SELECT rowid, {', '.join(pk)}, {column} FROM {table} WHERE rowid >= ? AND {column} IS NOT NULL "
           "ORDER BY rowid LIMIT 1")
    rng = random.SystemRandom()
    got: dict[int, tuple] = {}
    for _ in range(3 * sample if hi - lo >= sample else 0):     # (a small table is taken whole below)
        if len(got) >= sample:
            break
        row = con.execute(sql, (rng.randint(lo, hi),)).fetchone() or con.execute(sql, (lo,)).fetchone()
        if row is None:              # no row of the table has the column set
            break
        got.setdefault(row[0], tuple(row[1:]))
    if len(got) < sample:            # a small table (or few rows with the column): take them all
        got.update((r[0], tuple(r[1:])) for r in con.execute(
            f"SELECT rowid, {', '.join(pk)}, {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY rowid "
            "LIMIT ?", (sample,)))
    return list(got.values())[:sample]


async def _verify_v1(path: Path, barrier: Barrier, *, progress: Progress | None = None,
                     sample: int = SAMPLE_PER_COLUMN, full: bool = True) -> VerifyReport:
    """Format 1: structure, manifest, MAC, and a sample of sealed records opened.

    `full` parses every row too (`skm backup verify`); without it only the sampled rows are parsed
    (restore's first pass: its second pass parses every row inside a transaction that commits only
    if they all check out)."""
    f, reader = await _open_reader(path, barrier)
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
                _open_sample(barrier, table, column, [row[i] for i in pki], blob, unsealed)
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
    audit_seconds: float = 0.0      # of `seconds`, checking the restored audit chain

    def to_api(self) -> dict:
        return {"ok": True, "target": self.target, "records": self.records, "backupId": self.verify.manifest.backup_id,
                "tables": {t.name: t.count for t in self.verify.manifest.tables}, "audit": self.audit,
                "auditEpoch": self.epoch, "seconds": self.seconds, "auditSeconds": self.audit_seconds}


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
    t0 = time.monotonic()
    path = Path(path)
    if await _format_version(path, barrier) == 1:
        return await _restore_v1(path, barrier, target_url, force=force, progress=progress, t0=t0)
    sqlite_target = target_url.startswith("sqlite:///")
    db_path = Path(target_url[len("sqlite:///"):]) if sqlite_target else None
    if db_path is not None:
        # The scratch image sits beside the target: the same disk, so installing it is a rename.
        made = not db_path.parent.exists()
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if db_path is None:
        work = await asyncio.to_thread(lambda: scratch_dir(path.stat().st_size))
    else:
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".skm-restore-", dir=db_path.parent))
    try:
        report = await _verify_v2(path, barrier, work, progress=progress)
        m = report.manifest
        _known_schema(m)
        if db_path is not None:
            audit, epoch, audit_s = await _install_sqlite(report, barrier, db_path, path, force, target_url)
        else:
            audit, epoch, audit_s = await _restore_rows(report, barrier, target_url, path, force, progress)
    except BaseException:
        if db_path is not None and made and not db_path.exists():
            shutil.rmtree(db_path.parent, ignore_errors=True)
        raise
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    shown = describe_target(target_url)
    _log_restored(m, report.records, shown)
    return RestoreReport(report, shown, report.records, audit, epoch, round(time.monotonic() - t0, 3),
                         round(audit_s, 3))


def _log_restored(m: Manifest, records: int, shown: str) -> None:
    from server import logs      # here: structlog's import is not on an offline tool's start-up path
    logs.get("skm.backup").info("backup_restored", backup_id=m.backup_id, records=records, target=shown)


def _known_schema(m: Manifest) -> None:
    newer = sorted(set(m.schema_versions) - {v for v, _ in MIGRATIONS})
    if newer:
        raise InvalidBackup(f"the backup was made at schema version(s) {', '.join(map(str, newer))}, which this skm "
                            "does not know: restore it with the skm release that made it (or newer)")


def _backup_migrations(m: Manifest) -> list:
    return [mig for mig in MIGRATIONS if mig[0] in set(m.schema_versions)]


async def _sqlite_target_data(db_path: Path, shown: str, m: Manifest) -> dict[str, int]:
    """What makes an existing SQLite target non-empty (nothing when there is no database yet)."""
    if not db_path.exists():
        return {}
    await asyncio.to_thread(_is_database, db_path, shown)
    storage = open_storage(f"sqlite:///{db_path}")
    storage.migrations = []                 # look, do not migrate
    await _open_target(storage, shown)
    try:
        present = set(await _target_tables(storage))
        return await _existing_data(storage, [t.name for t in m.tables if t.name in present])
    finally:
        await storage.close()


def _is_database(path: Path, shown: str) -> None:
    """Refuse a target file that is not a SQLite database before the storage layer opens it."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"cannot open the target {shown}: {e}") from None


async def _checked_audit(db: Executor, barrier: Barrier) -> tuple[dict, float]:
    """The restored chain verified; and the seconds the check took (its modules' import not counted)."""
    import server.audit.log  # noqa: F401  (loaded first: the time reported is the check's own)
    ta = time.monotonic()
    audit = await verify_audit(db, barrier)
    if not audit.get("ok"):
        raise InvalidBackup(f"the backup's audit chain does not verify (record {audit.get('brokenSeq')}: "
                            f"{audit.get('reason')}); nothing was restored")
    return audit, time.monotonic() - ta


def _restored_from(m: Manifest, path: Path) -> dict:
    return {"backupId": m.backup_id, "createdAt": m.created_at, "backend": m.backend, "auditHead": m.audit_head,
            "file": path.name}


async def _install_sqlite(report: VerifyReport, barrier: Barrier, db_path: Path, path: Path, force: bool,
                          target_url: str) -> tuple[dict, str, float]:
    """The verified image becomes the target database: finished on the scratch file, then renamed."""
    m, image = report.manifest, report.image
    assert image is not None
    shown = describe_target(target_url)
    data = await _sqlite_target_data(db_path, shown, m)
    if data and not force:
        what = ", ".join(f"{t} ({n} rows)" if n else t for t, n in sorted(data.items()))
        raise Conflict(f"{shown} is not empty ({what}): restore only into an empty store, or pass --force to "
                       "replace everything in it")
    store = open_storage(f"sqlite:///{image}")
    store.migrations = _backup_migrations(m)
    await _open_target(store, shown)
    try:
        async with store.transaction() as tx:
            await store.set_sequences(tx, m.sequences)
        audit, audit_s = await _checked_audit(store, barrier)
        epoch = await _start_epoch(store, barrier, _restored_from(m, path))
    finally:
        await store.close()
    if set(m.schema_versions) != {v for v, _ in MIGRATIONS}:
        store = open_storage(f"sqlite:///{image}")     # the newer migrations, as an upgrade runs them
        await _open_target(store, shown)
        await store.close()
    await asyncio.to_thread(_replace_database, image, db_path)
    return audit, epoch, audit_s


def _replace_database(image: Path, db_path: Path) -> None:
    """Rename the finished image over the target; a forced restore's old WAL must not replay onto it."""
    con = sqlite3.connect(image, isolation_level=None)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{image}{suffix}").unlink(missing_ok=True)
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    os.replace(image, db_path)
    fd = os.open(db_path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _restore_rows(report: VerifyReport, barrier: Barrier, target_url: str, path: Path, force: bool,
                        progress: Progress | None) -> tuple[dict, str, float]:
    """Into PostgreSQL: the image's rows COPYed in one transaction over the backup's schema."""
    m = report.manifest
    (audit, audit_s), epoch = await _into_storage(
        target_url, barrier, m, path, force,
        lambda storage: _write_image(storage, barrier, report.image, m, progress))
    return audit, epoch, audit_s


async def _into_storage(target_url: str, barrier: Barrier, m: Manifest, path: Path, force: bool,
                        write: Callable[[Storage], Awaitable[Any]]) -> tuple[Any, str]:
    """The frame of a restore through the storage layer: the target opened at exactly the backup's schema
    (its rows fit), checked, written by `write`, a new audit epoch started; then the migrations newer than
    the backup (if any) run over the restored rows, as an upgrade would. Returns (what `write` returned,
    the epoch note)."""
    storage = open_storage(target_url)
    storage.migrations = _backup_migrations(m)
    shown = describe_target(target_url)
    await _open_target(storage, shown)
    try:
        await _check_target(storage, shown, m, force)
        written = await write(storage)
        epoch = await _start_epoch(storage, barrier, _restored_from(m, path))
    finally:
        await storage.close()
    if set(m.schema_versions) != {v for v, _ in MIGRATIONS}:
        storage = open_storage(target_url)
        await storage.open()
        await storage.close()
    return written, epoch


async def _check_target(storage: Storage, shown: str, m: Manifest, force: bool) -> None:
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


ROWS = 20000        # rows read from the image per COPY


async def _write_image(storage: Storage, barrier: Barrier, image: Path | None, m: Manifest,
                       progress: Progress | None) -> tuple[dict, float]:
    """The one transaction: clear, COPY every table from the image (keys and indexes made after the
    load, server/backup/pgload.py), check counts and audit chain, commit."""
    assert image is not None
    from server.backup.pgload import drop_for_load, restore_after_load
    con = await asyncio.to_thread(sqlite3.connect, f"file:{image}?mode=ro", uri=True, check_same_thread=False)
    try:
        async with storage.transaction() as tx:
            for t in reversed(m.tables):        # (a TRUNCATE costs more than this on the usual empty target)
                await tx.execute(f"DELETE FROM {t.name}")
            dropped = await drop_for_load(tx, [t.name for t in m.tables])
            done = 0
            for t in m.tables:
                if not t.count:
                    continue
                cur = await asyncio.to_thread(con.execute, f"SELECT {', '.join(t.columns)} FROM {t.name}")
                # Pipelined: the next rows are read from the image (a thread) while these are copied.
                pending = asyncio.ensure_future(asyncio.to_thread(cur.fetchmany, ROWS))
                try:
                    while rows := await pending:
                        pending = asyncio.ensure_future(asyncio.to_thread(cur.fetchmany, ROWS))
                        await tx.insert_rows(t.name, t.columns, rows)
                        done += len(rows)
                        if progress is not None:
                            progress("restore", done, m.total_records)
                finally:
                    if not pending.done():
                        with contextlib.suppress(BaseException):
                            await pending
            await restore_after_load(tx, dropped)
            for t in m.tables:
                n = int(await tx.fetchval(f"SELECT COUNT(*) AS n FROM {t.name}") or 0)
                if n != t.count:
                    raise InvalidBackup(f"table {t.name}: {n} rows restored, the backup lists {t.count}")
            await storage.set_sequences(tx, m.sequences)
            return await _checked_audit(tx, barrier)
    finally:
        con.close()


async def _restore_v1(path: Path, barrier: Barrier, target_url: str, *, force: bool, progress: Progress | None,
                      t0: float) -> RestoreReport:
    """Format 1 (JSON lines): read twice, rows inserted in one transaction (as version 1 always did)."""
    report = await _verify_v1(path, barrier, progress=progress, full=False)
    m = report.manifest
    _known_schema(m)
    if target_url.startswith("sqlite:///"):
        Path(target_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    audit, epoch = await _into_storage(target_url, barrier, m, path, force,
                                       lambda storage: _write(storage, barrier, path, m, progress))
    shown = describe_target(target_url)
    _log_restored(m, report.records, shown)
    return RestoreReport(report, shown, report.records, audit, epoch, round(time.monotonic() - t0, 3))


async def _open_target(storage: Storage, shown: str) -> None:
    """Open (and migrate) the target; a failure closes what was opened (no connection thread left)."""
    try:
        await _open_storage(storage, shown)
    except BaseException:
        with contextlib.suppress(Exception):
            await storage.close()
        raise


async def _open_storage(storage: Storage, shown: str) -> None:
    try:
        await storage.open()
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"cannot open the target {shown}: {e.strerror or type(e).__name__}") from None
    except sqlite3.DatabaseError as e:          # e.g. the file there is not a SQLite database
        raise ConfigError(f"cannot open the target {shown}: {e}") from None
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
