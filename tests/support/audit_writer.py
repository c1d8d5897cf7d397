"""An audit writer on its own SQLite file, unsealed with a random system key (no server around it)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import AsyncIterator

from server.audit import Audit
from server.barrier.barrier import Barrier
from server.settings import AuditSettings
from server.storage.sqlite import SQLiteStorage


@contextlib.asynccontextmanager
async def sqlite_audit(directory: Path, settings: AuditSettings | None = None
                       ) -> AsyncIterator[tuple[SQLiteStorage, Audit]]:
    storage = SQLiteStorage(str(directory / "skm.db"))
    await storage.open()
    try:
        barrier = Barrier()
        barrier.unseal({1: os.urandom(32)}, 1)
        yield storage, Audit(storage, barrier, settings or AuditSettings())
    finally:
        await storage.close()
