"""The version 1 backup writer (JSON lines), kept only to make files of the previous format version:
restore and verify must still read them (server/backup/format.py's Reader)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from server import VERSION, timeutil
from server.backup.format import FORMAT, Manifest, TableInfo, mac_key
from server.backup.snapshot import table_order
from server.barrier.barrier import Barrier
from server.barrier.rewrap import count_by_version
from server.storage.base import Snapshot, Storage
from server.storage.migrations import SEALED_COLUMNS



async def manifest_of(snap: Snapshot, barrier: Barrier, backend: str) -> Manifest:
    """The manifest of what `snap` sees, as the version 1 writer made it: tables in restore order, counts, audit
    head, key versions (read through the storage layer, row by row in SQL, on either backend)."""
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
                    mac_version=mac_version, key_check=check, audit_head=audit_head, skm_version=VERSION,
                    mac_nonce=os.urandom(12).hex())


def _enc_blob(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, memoryview):
        v = bytes(v)
    if not isinstance(v, (bytes, bytearray)):
        raise TypeError("a BLOB column holds a non-binary value")
    return base64.b64encode(v).decode("ascii")


def _row_encoder():
    """json's C encoder made once (JSONEncoder.encode builds one per call: half the cost of a row)."""
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii
    except ImportError:
        return None
    if c_make_encoder is None:
        return None

    def default(o: Any) -> Any:
        raise TypeError(f"a {type(o).__name__} value cannot go into a backup")
    enc = c_make_encoder(None, default, encode_basestring_ascii, None, ":", ",", False, False, False)
    return lambda row: "".join(enc(row, 0))


class Writer:
    """Builds the file's bytes; the caller sends them wherever (an HTTP stream, a file)."""

    def __init__(self, manifest: Manifest, key: bytes) -> None:
        self.manifest = manifest
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
        self._row = _row_encoder() or self._dumps
        self.records = 0
        self.bytes = 0

    def _out(self, data: bytes, mac: bool = True) -> bytes:
        if mac:
            self._mac.update(data)
        self.bytes += len(data)
        return data

    def header(self) -> bytes:
        return self._out(self._dumps(self.manifest.to_json()).encode() + b"\n")

    def rows(self, index: int, rows: Sequence[Sequence[Any]]) -> bytes:
        """Encode one batch of rows of table `index` (CPU work: callers run it in a thread)."""
        blob = self.manifest.tables[index].blob
        dumps = self._row
        if any(blob):
            lines = [dumps([index, *[_enc_blob(v) if b else v for v, b in zip(r, blob)]]) for r in rows]
        else:
            lines = [dumps([index, *r]) for r in rows]
        self.records += len(rows)
        return self._out(("\n".join(lines) + "\n").encode() if lines else b"")

    def trailer(self) -> bytes:
        end = {"end": FORMAT, "records": self.records, "mac": self._mac.hexdigest()}
        return self._out(self._dumps(end).encode() + b"\n", mac=False)



async def write_v1_backup(storage: Storage, barrier: Barrier, path: Path) -> Manifest:
    """A version 1 file of `storage` at `path`, made as the version 1 server made it."""
    async with storage.snapshot() as snap:
        manifest = await manifest_of(snap, barrier, storage.dialect)
        manifest.format_version = 1
        _v, key, _c = mac_key(barrier, manifest.backup_id, manifest.mac_version)
        w = Writer(manifest, key)
        out = [w.header()]
        for index, t in enumerate(manifest.tables):
            if t.count:
                async for rows in snap.stream(f"SELECT {', '.join(t.columns)} FROM {t.name} ORDER BY 1"):
                    out.append(w.rows(index, rows))
        out.append(w.trailer())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(out))
    return manifest
