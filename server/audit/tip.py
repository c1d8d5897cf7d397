"""The chain's tip, shared by the workers of one host (PostgreSQL only).

Each PostgreSQL write chains a batch after a head it names, and PostgreSQL refuses it when the head
has moved (`Audit._write_after_known_head`). Two workers writing side by side each chained after the
head *they* last saw, so their writes in flight collided: about 40 % of the two workers' statements
were refused and sent again (bench/README.md, "Where PostgreSQL's two workers lose").

The tip is the end of the last batch any worker of this host has *sent*, committed or not. A writer
takes it and puts its own batch's end in its place under an flock held only while the batch's
digests are computed; its statement then names that tip, and PostgreSQL's row lock on `audit_head`
makes it wait for the batch before it to commit rather than refuse it (`_WRITE_AFTER_TIP`). The tip is
only a hint: PostgreSQL's check of the head stays the one rule, so a stale, lost or wrong tip costs a
refused statement, never a broken chain. Replicas on other hosts do not share it and collide as before.

A file in the workers' run directory (0600; the supervisor removes it at start), mapped by every
worker: the sequence number (8 bytes) and the digest (64 hex characters) of the tip; 0 is none.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

_FORMAT = struct.Struct("<Q64s")
FILE_NAME = "audit-tip"


class SharedTip:
    """The tip file, mapped; `with tip:` takes its flock (blocking: the holder only hashes a batch)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _FORMAT.size:
                os.ftruncate(fd, _FORMAT.size)
            self._map = mmap.mmap(fd, _FORMAT.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __enter__(self) -> "SharedTip":
        # Held for a batch's digests only (tens of microseconds): waiting costs less than a refused statement.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def get(self) -> dict | None:
        """The tip as {"seq", "hash"}, or None (call with the lock held)."""
        seq, digest = _FORMAT.unpack_from(self._map)
        return {"seq": seq, "hash": digest.decode("ascii")} if seq else None

    def set(self, seq: int, digest: str) -> None:
        """Call with the lock held."""
        _FORMAT.pack_into(self._map, 0, seq, digest.encode("ascii"))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
