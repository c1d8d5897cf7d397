"""An audit writer on its own store (a SQLite file, or any storage URL), unsealed with a random system key (no
server around it)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import AsyncIterator

from server.audit import Audit
from server.barrier.barrier import Barrier
from server.settings import AuditSettings
from server.storage.base import Storage
from server.storage.factory import open_storage


def sqlite_audit(directory: Path, settings: AuditSettings | None = None
                 ) -> contextlib.AbstractAsyncContextManager[tuple[Storage, Audit]]:
    return storage_audit(f"sqlite:///{directory / 'skm.db'}", settings)


@contextlib.asynccontextmanager
async def storage_audit(url: str, settings: AuditSettings | None = None) -> AsyncIterator[tuple[Storage, Audit]]:
    storage = open_storage(url)
    await storage.open()
    try:
        barrier = Barrier()
        barrier.unseal({1: os.urandom(32)}, 1)
        yield storage, Audit(storage, barrier, settings or AuditSettings())
    finally:
        await storage.close()
