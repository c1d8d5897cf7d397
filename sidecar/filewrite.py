"""Write a rendered file so that no reader ever sees it half-written or with a wider mode.

A temp file in the destination's directory is created with no permission bits at all, given its
owner, group and final mode, filled, fsynced, and renamed over the destination (atomic on one file
system); the directory is fsynced so the rename survives a crash. Blocking: call it in a thread.
"""
from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Written:
    ino: int
    dev: int
    size: int
    mode: int
    uid: int
    gid: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Written":
        return cls(st.st_ino, st.st_dev, st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid)


def write_atomic(dest: Path, data: bytes, mode: int, uid: int | None, gid: int | None) -> Written:
    tmp = dest.parent / f".{dest.name}.skm-{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o000)
    try:
        try:
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)             # after chown: a chown may clear mode bits
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return Written.of(st)


def current(dest: Path) -> Written | None:
    try:
        return Written.of(os.lstat(dest))
    except FileNotFoundError:
        return None


def remove(dest: Path) -> bool:
    try:
        os.unlink(dest)
    except FileNotFoundError:
        return False
    return True


def read_existing(dest: Path, limit: int) -> bytes | None:
    """What the destination holds now (None: missing, unreadable, or not a regular file)."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding `path` (longest mount point prefix in /proc/self/mounts)."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].encode().decode("unicode_escape")     # \040 for spaces
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind
