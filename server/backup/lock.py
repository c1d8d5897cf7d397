"""One backup at a time per process: the API and the schedule share this lock (kept on the runtime)."""
from __future__ import annotations

import asyncio

LOCK = "backup_lock"          # rt.extra: one backup at a time per process (API and schedule share it)


def backup_lock(rt) -> asyncio.Lock:
    lock = rt.extra.get(LOCK)
    if lock is None:
        lock = rt.extra[LOCK] = asyncio.Lock()
    return lock
