"""Backup format versions 2 and 3: the store's tables as one SQLite database image inside the container.

    {"format":"skm-backup","formatVersion":3, ...manifest..., "payload":{"kind":"sqlite-image","bytes":N}}\n
    N bytes: a SQLite database file (every table of the backup, plus schema_version)
    {"end":"skm-backup","bytes":N,"mac":"<hex>"}\n

The image is a store as the SQLite backend would hold it at the backup's schema versions: every
row exactly as stored (sealed columns still sealed under the system key). From a SQLite source it
is a page copy of the live database by SQLite's online backup, its freelist zeroed, when the live
connections delete securely (`page_copy`), else `VACUUM INTO` (`vacuum_into`, a rebuilt file):
either is one read transaction, a consistent snapshot while writers go on, and neither carries a
deleted record (docs/disaster-recovery.md). From a
PostgreSQL source the snapshot's rows are inserted into a fresh image made by the SQLite rendering
of the same migrations. The MAC covers the manifest line and every payload byte (format 3:
AES-256-GMAC under HKDF(system key, "skm backup gmac v3:" + backup id) with the manifest's nonce;
format 2: HMAC-SHA256 under HKDF(system key, "skm backup mac v1:" + backup id); server/backup/format.py
`new_mac`); a reader checks it before SQLite ever opens the image, so a damaged or forged image is
refused before it is parsed.

Why an image rather than rows: SQLite writes and reads it in C (no Python per row or per value),
a restore into SQLite installs it as the new database file, and one into PostgreSQL COPYs its
rows. Version 1 files (JSON lines, server/backup/format.py) are still read.
"""
from __future__ import annotations

import hmac
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

from server.backup.format import FORMAT, InvalidBackup, Manifest, new_mac
from server.storage.migrations import MIGRATIONS, render

PAYLOAD_KIND = "sqlite-image"
CHUNK = 1 << 20                  # bytes read, MAC'd and sent at a time
MAX_TRAILER = 4096
INTEGRITY_FAILED = ("integrity check failed: the file was modified after it was written (a changed byte, spliced "
                    "or removed data); do not restore it")


SHM = Path("/dev/shm")


def scratch_dir(size: int, beside: Path | None = None) -> Path:
    """A private (0700) directory for an image of about `size` bytes. In memory (/dev/shm) when that
    has four times the room: the scratch copy is written and read back once, and a disk shared with
    the live database made that the slowest part of a backup (2-3x). Otherwise beside `beside` (the
    database's disk) or in the system's temporary directory. Blocking."""
    # The creator's pid is in the name: a process that died mid-backup leaves its directory behind (in RAM
    # on /dev/shm), and the next scratch_dir() removes the directories of processes no longer alive.
    prefix = f"skm-backup-{os.getpid()}-"
    try:
        st = os.statvfs(SHM)
        if SHM.is_dir() and os.access(SHM, os.W_OK) and st.f_bavail * st.f_frsize >= 4 * max(size, 1 << 20):
            remove_orphans(SHM)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=SHM))
    except OSError:
        pass
    where = Path(beside if beside is not None else tempfile.gettempdir())
    remove_orphans(where)
    return Path(tempfile.mkdtemp(prefix="." + prefix, dir=where))


def remove_orphans(where: Path) -> list[Path]:
    """Remove the scratch directories under `where` whose creating process is gone; returns them. Only
    ours (the name, a directory owned by this uid), never one of a live process. Blocking."""
    gone = []
    try:
        entries = list(os.scandir(where))
    except OSError:
        return gone
    for e in entries:
        parts = e.name.lstrip(".").split("-")
        if len(parts) < 4 or parts[:2] != ["skm", "backup"] or not parts[2].isdigit():
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(parts[2]), 0)
            continue                                  # its process is alive (or is another user's)
        except ProcessLookupError:
            shutil.rmtree(e.path, ignore_errors=True)
            gone.append(Path(e.path))
        except (PermissionError, OSError, ValueError):
            continue
    return gone


def database_size(path: str) -> int:
    """A SQLite database's bytes with its WAL (what VACUUM INTO may copy at most)."""
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


# ----------------------------------------------------------------------------- making the image (blocking)
def vacuum_into(source: str, dest: Path) -> None:
    """A consistent, compacted copy of the live SQLite database at `source` (run in a thread: the
    sqlite3 module releases the GIL while SQLite works, so the server keeps serving). A rebuilt file:
    no freed page or deleted cell of the source comes along, whatever wrote it."""
    con = sqlite3.connect(source, timeout=5.0, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout=5000")
        con.execute("VACUUM INTO ?", (str(dest),))
    finally:
        con.close()
    _rollback_journal(dest)


def read_snapshot(source: str) -> sqlite3.Connection:
    """A connection to the live SQLite database at `source` holding one read transaction (WAL: what it
    sees stays put while writers go on), usable from another thread. Blocking."""
    con = sqlite3.connect(source, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        con.execute("PRAGMA busy_timeout=5000")
        con.execute("BEGIN")
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()     # the snapshot starts at the first read
    except BaseException:
        con.close()
        raise
    return con


def page_copy(source: str | sqlite3.Connection, dest: Path) -> None:
    """A consistent page-for-page copy of the live SQLite database at `source` (SQLite's online backup,
    what `sqlite3 .backup` does: one read transaction, writers go on; or the read transaction already
    open on `source` when it is a connection from `read_snapshot`), then every page on its freelist
    zeroed. Three times faster than `vacuum_into` (no rows re-inserted, no index rebuilt); only for a
    database whose connections delete securely (`PRAGMA secure_delete`: a deleted cell is zeroed in
    its page, so the pages in use hold no deleted record; the freelist is scrubbed here whatever the
    mode). Blocking: run it in a thread."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    src = source if isinstance(source, sqlite3.Connection) else sqlite3.connect(source, timeout=5.0,
                                                                                isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            dst.execute("PRAGMA journal_mode=OFF")         # a scratch file until it is complete
            dst.execute("PRAGMA synchronous=OFF")
            src.backup(dst)                                 # pages=-1: every page in one step
        finally:
            dst.close()
    finally:
        if src is not source:
            src.close()
    scrub_freelist(dest)
    _rollback_journal(dest)


def scrub_freelist(path: Path) -> int:
    """Zero what the freelist pages of the (closed) database file at `path` still hold: freelist leaf
    pages whole, trunk pages past their list of leaves. Returns the pages touched. Blocking."""
    with open(path, "r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise InvalidBackup("the snapshot is not a SQLite database")
        page = int.from_bytes(header[16:18], "big")
        page = 65536 if page == 1 else page
        pages = os.fstat(f.fileno()).st_size // page
        trunk = int.from_bytes(header[32:36], "big")
        zero = bytes(page)
        touched = 0
        seen = 0
        while trunk:
            seen += 1
            if not 1 < trunk <= pages or seen > pages:
                raise InvalidBackup("the snapshot's freelist is damaged")
            f.seek((trunk - 1) * page)
            data = f.read(page)
            nxt, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
            if 8 + 4 * n > page:
                raise InvalidBackup("the snapshot's freelist is damaged")
            leaves = [int.from_bytes(data[8 + 4 * i:12 + 4 * i], "big") for i in range(n)]
            f.seek((trunk - 1) * page + 8 + 4 * n)
            f.write(zero[8 + 4 * n:])
            touched += 1
            for leaf in leaves:
                if 1 < leaf <= pages:
                    f.seek((leaf - 1) * page)
                    f.write(zero)
                    touched += 1
            trunk = nxt
        f.flush()
    return touched


def _rollback_journal(path: Path) -> None:
    """The image opens without a WAL beside it (it travels as one file)."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=DELETE")
    finally:
        con.close()
    os.chmod(path, 0o600)


class RowsImage:
    """A fresh image at the given schema versions that rows are inserted into (a PostgreSQL source).
    Blocking: call every method in a thread."""

    def __init__(self, dest: Path, schema_versions: Iterable[int]) -> None:
        wanted = set(schema_versions)
        unknown = sorted(wanted - {v for v, _ in MIGRATIONS})
        if unknown:
            raise InvalidBackup(f"the store is at schema version(s) {', '.join(map(str, unknown))}, which this server "
                                "does not know: take the backup from a replica running the newest release")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self.dest = dest
        # Made in one worker thread, used from others, one call at a time under the lock: a caller cancelled
        # while `finish` or `insert` runs in its thread calls `close` from another, and sqlite3 must never
        # see two threads on one connection (closing it under a running statement crashed the process).
        self._lock = threading.Lock()
        self.con = sqlite3.connect(dest, isolation_level=None, check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=OFF")      # a scratch file until it is complete
        self.con.execute("PRAGMA synchronous=OFF")
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, statements in MIGRATIONS:
            if version in wanted:
                for stmt in statements:
                    self.con.execute(render(stmt, "sqlite"))
                self.con.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        # Rows a migration seeds (audit_head's id 1) come from the source instead.
        for (name,) in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                        "'sqlite_%' AND name <> 'schema_version'").fetchall():
            self.con.execute(f"DELETE FROM {name}")
        # Secondary indexes are built once over the loaded rows (a sort), not row by row.
        self._indexes = self.con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT "
                                         "NULL ORDER BY name").fetchall()
        for name, _sql in self._indexes:
            self.con.execute(f"DROP INDEX {name}")
        self.con.execute("BEGIN")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            self.con.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                 f"VALUES ({', '.join('?' * len(columns))})", rows)

    def finish(self) -> None:
        with self._lock:
            for _name, sql in self._indexes:
                self.con.execute(sql)
            self.con.execute("COMMIT")
            self.con.close()
            _rollback_journal(self.dest)

    def close(self) -> None:
        """Waits for a call still running in another thread (its caller was cancelled), then closes."""
        with self._lock:
            self.con.close()


# ----------------------------------------------------------------------------- the container
class ImageWriter:
    """The container's bytes around an image: header line, payload (MAC'd as it goes), trailer."""

    def __init__(self, manifest: Manifest, key: bytes) -> None:
        self.manifest = manifest
        self._mac = new_mac(manifest, key)
        self.bytes = 0
        self.payload_bytes = 0

    def header(self) -> bytes:
        data = json.dumps(self.manifest.to_json(), separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        self._mac.update(data)
        self.bytes += len(data)
        return data

    def read_payload(self, f: IO[bytes]) -> bytes:
        """The next chunk of the image, MAC'd and counted (blocking: run in the thread that reads ahead,
        so the HMAC of this chunk runs beside the TLS encryption of the last one on the event loop).
        Chunks are read, and so MAC'd, one after another in file order: the order they are sent in."""
        data = f.read(CHUNK)
        self._mac.update(data)
        self.bytes += len(data)
        self.payload_bytes += len(data)
        return data

    def trailer(self) -> bytes:
        if self.payload_bytes != self.manifest.payload_bytes:
            raise RuntimeError("the image changed size while it was sent")
        data = json.dumps({"end": FORMAT, "bytes": self.payload_bytes, "mac": self._mac.hexdigest()},
                          separators=(",", ":")).encode() + b"\n"
        self.bytes += len(data)
        return data


def extract(f: IO[bytes], first: bytes, manifest: Manifest, key: bytes, dest: Path,
            progress: Callable[[int, int], object] | None = None) -> int:
    """Copy the payload of the file `f` (positioned after its manifest line `first`) to `dest` (0600),
    checking the structure and the MAC over the whole; returns the file's size. Blocking.

    `dest` must not be opened by SQLite, or trusted in any way, unless this returned."""
    mac = new_mac(manifest, key)
    mac.update(first)
    total = manifest.payload_bytes
    done = 0
    step = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while done < total:
            data = f.read(min(CHUNK, total - done))
            if not data:
                raise InvalidBackup(f"the file is truncated: it ends {done} bytes into its {total}-byte database "
                                    "image, without its integrity trailer")
            mac.update(data)
            out.write(data)
            done += len(data)
            step += len(data)
            if progress is not None and step >= 8 * CHUNK:
                step = 0
                progress(done, total)
    line = f.readline(MAX_TRAILER + 1)
    if not line:
        raise InvalidBackup("the file is truncated: it ends after its database image, without its integrity trailer")
    if not line.endswith(b"\n"):
        raise InvalidBackup("the file is truncated or damaged: its integrity trailer is cut short or too long")
    try:
        end = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        end = None
    if not isinstance(end, dict) or end.get("end") != FORMAT or not isinstance(end.get("mac"), str):
        raise InvalidBackup("the file is damaged: what follows the database image is not its integrity trailer "
                            "(the image's size in the manifest was altered, or bytes were removed or added)")
    if f.read(1):
        raise InvalidBackup("the file has data after its integrity trailer (two files joined, or damage)")
    if not hmac.compare_digest(mac.hexdigest(), end["mac"]):
        raise InvalidBackup(INTEGRITY_FAILED)
    if end.get("bytes") != total:
        raise InvalidBackup(f"the trailer counts {end.get('bytes')} image bytes, the manifest {total}")
    if progress is not None:
        progress(done, total)
    return len(first) + total + len(line)
