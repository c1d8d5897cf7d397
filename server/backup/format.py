"""The backup file: a manifest, every stored row exactly as stored, and a MAC over the whole.

The manifest (first line, JSON, so `head -1` shows it) and the key check are common to every
format version. Version 2, written now, carries the rows as a SQLite database image
(server/backup/image.py). Version 1, still read (restore and verify), is the layout below:
UTF-8 JSON lines, one per row:

    {"format":"skm-backup","formatVersion":1, ...manifest...}\n
    [tableIndex, value, value, ...]\n            one line per row, tables in restore order
    ...
    {"end":"skm-backup","records":N,"mac":"<hex>"}\n

Values are JSON numbers, strings and null; BLOB/BYTEA columns (the manifest names them) are
base64 text. Sealed columns stay sealed under the system key exactly as stored: the file holds
no plaintext, no root key and no unwrapped system key. The MAC is HMAC-SHA256 over every byte
before the trailer under HKDF(system key version V, "skm backup mac v1" + backup id), V named
in the manifest: a bit flip, a truncation, a spliced or reordered row, or a file from another
installation is refused. A backup made before a system-key rotation verifies while its version
is in the keyring.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any, Iterator

from server.barrier.barrier import Barrier
from server.errors import BarrierError, SKMError

FORMAT = "skm-backup"
FORMAT_VERSION = 3                      # written: a SQLite image payload (server/backup/image.py), AES-256-GMAC
READABLE_VERSIONS = (1, 2, 3)           # 1: JSON lines (the Reader below); 2: the image under HMAC-SHA256
SUFFIX = ".skmbak"
MAC_PURPOSE = b"skm backup mac v1:"     # the HMAC-SHA256 key (formats 1 and 2)
GMAC_PURPOSE = b"skm backup gmac v3:"   # the AES-256-GMAC key (format 3): a key of its own, not the HMAC's
HMAC_SHA256, AES_GMAC = "HMAC-SHA256", "AES-256-GMAC"
CHECK_PURPOSE = b"skm backup key check v1:"
MAX_MANIFEST = 4 * 1024 * 1024          # bytes of the first line we are willing to parse
MAX_LINE = 8 * 1024 * 1024              # one row (a 32 KB secret sealed and base64'd is far below)


_BAD_TYPES = frozenset({list, dict, bool})      # JSON values no column holds


class InvalidBackup(SKMError):
    """The file is not a backup this program can trust or use; `detail` names what is wrong."""
    status, result_code, message = 400, -1610, "Invalid Backup"


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: tuple[str, ...]
    blob: tuple[bool, ...]
    count: int

    @cached_property
    def blob_indexes(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blob) if b)

    def to_json(self) -> dict:
        return {"name": self.name, "columns": list(self.columns),
                "blobColumns": [c for c, b in zip(self.columns, self.blob) if b], "count": self.count}


@dataclass
class Manifest:
    backup_id: str
    created_at: str
    backend: str
    schema_versions: list[int]
    tables: list[TableInfo]
    sequences: dict[str, int]
    system_key_versions: list[int]          # every version a restore needs (records + the MAC's)
    records_by_version: dict[int, int]
    mac_version: int
    key_check: str
    audit_head: dict[str, Any]
    skm_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    payload_bytes: int = 0                  # version 2: the SQLite image's size
    mac_nonce: str = ""                     # version 3: the GMAC's 96-bit nonce (hex)

    @property
    def mac_algorithm(self) -> str:
        return AES_GMAC if self.format_version >= 3 else HMAC_SHA256

    @property
    def mac_purpose(self) -> bytes:
        return GMAC_PURPOSE if self.format_version >= 3 else MAC_PURPOSE

    @property
    def total_records(self) -> int:
        return sum(t.count for t in self.tables)

    def to_json(self) -> dict:
        out = {"format": FORMAT, "formatVersion": self.format_version, "backupId": self.backup_id,
                "createdAt": self.created_at, "skmVersion": self.skm_version,
                "source": {"backend": self.backend, "schemaVersion": max(self.schema_versions, default=0),
                           "schemaVersions": self.schema_versions},
                "tables": [t.to_json() for t in self.tables], "sequences": self.sequences,
                "systemKeyVersions": self.system_key_versions,
                "recordsBySystemKeyVersion": {str(v): n for v, n in sorted(self.records_by_version.items())},
                "mac": {"algorithm": self.mac_algorithm, "kdf": "HKDF-SHA256", "systemKeyVersion": self.mac_version,
                        "keyCheck": self.key_check},
                "auditHead": self.audit_head, "records": self.total_records}
        if self.format_version >= 3:
            out["mac"]["nonce"] = self.mac_nonce
        if self.format_version >= 2:
            out["payload"] = {"kind": "sqlite-image", "bytes": self.payload_bytes}
        return out

    @classmethod
    def from_json(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InvalidBackup("not an skm backup file (its first line is not an skm-backup manifest)")
        fv = d.get("formatVersion")
        if type(fv) is not int or fv not in READABLE_VERSIONS:
            raise InvalidBackup(f"unknown backup format version {fv!r}: this skm reads versions "
                                f"{', '.join(map(str, READABLE_VERSIONS))}; use the skm release that wrote it "
                                "(or newer)")
        try:
            tables = []
            for t in d["tables"]:
                cols = tuple(str(c) for c in t["columns"])
                blobs = set(t["blobColumns"])
                if not cols or not all(_ident(c) for c in cols) or not _ident(t["name"]) or not blobs <= set(cols):
                    raise ValueError("bad table")
                tables.append(TableInfo(str(t["name"]), cols, tuple(c in blobs for c in cols), _nat(t["count"])))
            mac = d["mac"]
            if mac["algorithm"] != (AES_GMAC if fv >= 3 else HMAC_SHA256) or mac["kdf"] != "HKDF-SHA256":
                raise InvalidBackup(f"unknown MAC {mac['algorithm']}/{mac['kdf']} for format version {fv}")
            nonce = ""
            if fv >= 3:
                nonce = str(mac["nonce"])
                if len(nonce) != 24 or any(c not in "0123456789abcdef" for c in nonce):
                    raise ValueError("bad nonce")
            src = d["source"]
            payload = 0
            if fv >= 2:
                if d["payload"]["kind"] != "sqlite-image":
                    raise InvalidBackup(f"unknown payload kind {d['payload']['kind']!r}")
                payload = _nat(d["payload"]["bytes"])
            return cls(backup_id=_hexid(d["backupId"]), created_at=str(d["createdAt"]), backend=str(src["backend"]),
                       schema_versions=[_nat(v) for v in src["schemaVersions"]], tables=tables,
                       sequences={str(k): _nat(v) for k, v in d["sequences"].items()},
                       system_key_versions=[_nat(v) for v in d["systemKeyVersions"]],
                       records_by_version={int(k): _nat(v) for k, v in d["recordsBySystemKeyVersion"].items()},
                       mac_version=_nat(mac["systemKeyVersion"]), key_check=str(mac["keyCheck"]),
                       audit_head=dict(d["auditHead"]), skm_version=str(d.get("skmVersion", "")),
                       format_version=fv, payload_bytes=payload, mac_nonce=nonce)
        except InvalidBackup:
            raise
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidBackup("the manifest is malformed (a field is missing or has the wrong type)") from None


def _ident(name: Any) -> bool:
    """Table and column names go into SQL: letters, digits and underscores only."""
    return isinstance(name, str) and 0 < len(name) <= 63 and name.replace("_", "").isalnum() and name.isascii()


def _nat(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError("not a natural number")
    return v


def _hexid(v: Any) -> str:
    if not isinstance(v, str) or len(v) != 32 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("bad id")
    return v


def mac_key(barrier: Barrier, backup_id: str, version: int | None = None,
            purpose: bytes = MAC_PURPOSE) -> tuple[int, bytes, str]:
    """(system-key version, MAC key, key check) for a backup id; the check names the key, reveals nothing."""
    try:
        v, key = barrier.derive(purpose + backup_id.encode(), version)
        _, check = barrier.derive(CHECK_PURPOSE + backup_id.encode(), v)
    except BarrierError as e:
        raise InvalidBackup(f"cannot check the backup's integrity: {e.detail}") from None
    return v, key, check.hex()[:16]


def new_mac(m: Manifest, key: bytes):
    """The whole-file MAC of `m`'s format, fed with `update(bytes)`, read with `hexdigest()`."""
    if m.format_version >= 3:
        return _Gmac(key, bytes.fromhex(m.mac_nonce))
    return hmac.new(key, digestmod=hashlib.sha256)


class _Gmac:
    """AES-256-GMAC (NIST SP 800-38D: GCM over the whole file as associated data, no plaintext), a
    128-bit tag. Why not HMAC-SHA256 any more: 1.3 GB/s here against GHASH's 13-23 GB/s, 40 ms of every
    100,000-key backup and restore. Each backup has its own key (HKDF of the system key and the random
    backup id) and a random nonce, so no (key, nonce) pair is ever used twice."""

    def __init__(self, key: bytes, nonce: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes   # (not on the CLI's start-up)
        self._ctx = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        self._tag: str | None = None

    def update(self, data: bytes) -> None:
        self._ctx.authenticate_additional_data(data)

    def hexdigest(self) -> str:
        if self._tag is None:
            self._ctx.finalize()
            self._tag = self._ctx.tag.hex()
        return self._tag


def missing_versions(m: Manifest, barrier: Barrier) -> None:
    """Refuse, naming them, when the keyring lacks a system-key version the backup needs."""
    missing = sorted((set(m.system_key_versions) | {m.mac_version}) - set(barrier.versions()))
    if missing:
        raise InvalidBackup(f"this backup needs system-key version(s) {', '.join(map(str, missing))}, which this "
                            f"keyring does not hold (it holds {', '.join(map(str, barrier.versions())) or 'none'}): "
                            "restore with the keyring the backup was made under, before those versions were "
                            "retired")


@dataclass
class Batch:
    table: TableInfo
    index: int
    rows: list[list[Any]]
    size: int                # bytes of the lines


def read_manifest(f: IO[bytes], barrier: Barrier) -> tuple[bytes, Manifest, bytes]:
    """(manifest line, manifest, MAC key) of any readable version; refuses another installation's file."""
    first = f.readline(MAX_MANIFEST + 1)
    if not first:
        raise InvalidBackup("the file is empty")
    if not first.endswith(b"\n"):
        raise InvalidBackup("the manifest line is cut short or too long: not a complete skm backup")
    try:
        data = json.loads(first)
    except (ValueError, UnicodeDecodeError):
        raise InvalidBackup("not an skm backup file (its first line is not JSON)") from None
    m = Manifest.from_json(data)
    missing_versions(m, barrier)
    _, key, check = mac_key(barrier, m.backup_id, m.mac_version, m.mac_purpose)
    if not hmac.compare_digest(check, m.key_check):
        raise InvalidBackup(f"this backup was made under a different system key (system-key version "
                            f"{m.mac_version} here is another key): it comes from another installation, or "
                            "its manifest was altered")
    return first, m, key


class Reader:
    """Reads and checks a backup file: structure as it goes, the MAC at the end (`finish`).

    Nothing read may be trusted (or written anywhere for good) before `finish()` returned.
    """

    def __init__(self, f: IO[bytes], barrier: Barrier) -> None:
        self.f = f
        first, self.manifest, key = read_manifest(f, barrier)
        m = self.manifest
        if m.format_version != 1:
            raise InvalidBackup(f"internal: format version {m.format_version} is not read row by row")
        self._mac = hmac.new(key, first, hashlib.sha256)
        self.records = 0
        self.bytes = len(first)
        self._counts = [0] * len(m.tables)
        self._last_index = 0
        self._done = False
        self._trailer: dict | None = None

    def _chunks(self, size: int) -> Iterator[tuple[int, list[bytes]]]:
        """Row lines, MAC'd as read, `size` at a time with the first one's line number; then the trailer."""
        n = 1                                    # line number of the last line read (the manifest is 1)
        while True:
            lines: list[bytes] = []
            first = n + 1
            for line in iter(lambda: self.f.readline(MAX_LINE + 1), b""):
                n += 1
                self.bytes += len(line)
                if not line.endswith(b"\n"):
                    if len(line) > MAX_LINE:
                        raise InvalidBackup(f"line {n} is longer than any row can be: the file is damaged")
                    raise InvalidBackup(f"the file is truncated: it ends inside line {n}, before its integrity "
                                        "trailer")
                if line.startswith(b"{"):
                    self._trailer = self._parse_trailer(line, n)
                    break
                self._mac.update(line)
                lines.append(line)
                if len(lines) >= size:
                    break
            if lines:
                yield first, lines
            if self._trailer is not None or len(lines) < size:
                break
        if self._trailer is None:
            raise InvalidBackup(f"the file is truncated: it ends after {self.records} of "
                                f"{self.manifest.total_records} records, without its integrity trailer")
        if self.f.read(1):
            raise InvalidBackup("the file has data after its integrity trailer (two files joined, or damage)")

    def batches(self, size: int = 1000) -> Iterator[Batch]:
        """Rows grouped by table, at most `size` per batch, every one parsed; blob values decoded to bytes."""
        for first, lines in self._chunks(size):
            yield from self._parse_lines(lines, first)

    def scan(self, size: int = 4096) -> Iterator[tuple[int, int, bytes]]:
        """(table index, line number, line) of every row without parsing it: the MAC, the counts and the
        table order are checked as in `batches`; `parse_row` parses the lines one wants."""
        tables = len(self.manifest.tables)
        for first, lines in self._chunks(size):
            for k, line in enumerate(lines):
                lineno = first + k
                comma = line.find(b",", 1, 12)
                try:
                    index = int(line[1:comma]) if line.startswith(b"[") and comma > 1 else -1
                except ValueError:
                    index = -1
                if not 0 <= index < tables:
                    raise InvalidBackup(f"line {lineno} is not a row of a table the manifest lists: damaged or "
                                        "edited")
                if index < self._last_index:
                    raise InvalidBackup(f"line {lineno}: rows of table {self.manifest.tables[index].name} appear "
                                        "after a later table's: rows were moved or spliced")
                self._last_index = index
                self._counts[index] += 1
                self.records += 1
                yield index, lineno, line

    def parse_row(self, line: bytes, lineno: int) -> tuple[int, list[Any]]:
        """One row line checked and decoded (its place in the order is not checked again)."""
        last, self._last_index = self._last_index, 0
        try:
            return self._check_row(self._load_line(line, lineno), lineno)
        finally:
            self._last_index = last

    def _parse_lines(self, lines: list[bytes], first: int) -> Iterator[Batch]:
        """Parse a run of row lines (one JSON document for all of them: much cheaper than one each)."""
        try:
            rows = json.loads(b"[" + b",".join(lines) + b"]")
        except (ValueError, UnicodeDecodeError):
            rows = None
        if not isinstance(rows, list) or len(rows) != len(lines):
            rows = [self._load_line(line, first + k) for k, line in enumerate(lines)]   # names the bad line
        m = self.manifest
        current: Batch | None = None
        for k, row in enumerate(rows):
            index, values = self._check_row(row, first + k)
            self._counts[index] += 1
            self.records += 1
            if current is not None and current.index != index:
                yield current
                current = None
            if current is None:
                current = Batch(m.tables[index], index, [], 0)
            current.rows.append(values)
            current.size += len(lines[k])
        if current is not None:
            yield current

    @staticmethod
    def _load_line(line: bytes, lineno: int) -> Any:
        try:
            return json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise InvalidBackup(f"line {lineno} is not valid JSON: the file was damaged or edited "
                                "(the integrity check would fail too)") from None

    def _check_row(self, row: Any, lineno: int) -> tuple[int, list[Any]]:
        m = self.manifest
        if not isinstance(row, list) or not row or type(row[0]) is not int or not 0 <= row[0] < len(m.tables):
            raise InvalidBackup(f"line {lineno} is not a row of a table the manifest lists: damaged or edited")
        index = row[0]
        if index < self._last_index:
            raise InvalidBackup(f"line {lineno}: rows of table {m.tables[index].name} appear after a later table's: "
                                "rows were moved or spliced")
        self._last_index = index
        t = m.tables[index]
        values = row[1:]
        if len(values) != len(t.columns):
            raise InvalidBackup(f"line {lineno}: a {t.name} row has {len(values)} values for {len(t.columns)} columns")
        if not _BAD_TYPES.isdisjoint(map(type, values)):
            raise InvalidBackup(f"line {lineno}: a {t.name} row holds a value of an unexpected type")
        for i in t.blob_indexes:
            v = values[i]
            if v is not None:
                try:
                    values[i] = base64.b64decode(v, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise InvalidBackup(f"line {lineno}: {t.name}.{t.columns[i]} is not valid base64: damaged or "
                                        "edited") from None
        return index, values

    def _parse_trailer(self, line: bytes, lineno: int) -> dict:
        try:
            end = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise InvalidBackup(f"line {lineno} (the integrity trailer) is not valid JSON: damaged") from None
        if not isinstance(end, dict) or end.get("end") != FORMAT or not isinstance(end.get("mac"), str):
            raise InvalidBackup(f"line {lineno} is neither a row nor the integrity trailer: damaged or edited")
        return end

    def finish(self) -> None:
        """Checks after the last batch: the MAC first (nothing else counts without it), then counts."""
        if self._trailer is None:
            raise InvalidBackup("the file was not read to its end")
        m = self.manifest
        if not hmac.compare_digest(self._mac.hexdigest(), self._trailer["mac"]):
            raise InvalidBackup("integrity check failed: the file was modified after it was written (a changed "
                                "byte, a spliced or removed row); do not restore it")
        if self._trailer.get("records") != self.records:
            raise InvalidBackup(f"the trailer counts {self._trailer.get('records')} records, the file holds "
                                f"{self.records}")
        for t, n in zip(m.tables, self._counts):
            if t.count != n:
                raise InvalidBackup(f"table {t.name}: the manifest lists {t.count} rows, the file holds {n}")
        self._done = True

    @property
    def verified(self) -> bool:
        return self._done
