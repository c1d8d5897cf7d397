"""The version 1 backup writer (JSON lines), kept only to make files of the previous format version:
restore and verify must still read them (server/backup/format.py's Reader)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Sequence

from server.backup.format import FORMAT, Manifest, mac_key
from server.backup.snapshot import manifest_of
from server.barrier.barrier import Barrier
from server.storage.base import Storage


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
