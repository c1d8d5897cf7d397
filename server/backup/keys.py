"""The system key for offline verify and restore, fetched exactly as `skm server run` fetches it.

Root key (file or HSM, `[rootkey]`) plus the wrapped keyring from the local file or the
system-key server (`[systemkey]`): server.app's own provider, source and unseal, nothing copied.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from server.barrier.barrier import Barrier
from server.settings import ServerConfig


@asynccontextmanager
async def unsealed_barrier(cfg: ServerConfig) -> AsyncIterator[Barrier]:
    """A barrier holding every system-key version of `cfg`'s keyring, sealed again on exit."""
    from server.app import system_key_source, unseal_once
    from server.barrier.rootkey import make_provider
    root = make_provider(cfg.rootkey, cfg.root_key_path())
    source = system_key_source(cfg)
    barrier = Barrier()
    try:
        await unseal_once(barrier, source, root)
        yield barrier
    finally:
        barrier.seal_now("backup tool finished")
        await source.close()
        await root.close()
