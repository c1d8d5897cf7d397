"""The key server's system-key source and root key, as configured: built once, shared by the start-up
unseal, the keyring refresh route, the keyring follower and the backup tools.

Here rather than in server/app.py or remote.py: both need them, and remote.py (the client) must not
import the application.
"""
from __future__ import annotations

import asyncio
from typing import Any

from server.barrier.barrier import Barrier
from server.barrier.keyring import LocalKeyringSource, SystemKeySource
from server.barrier.providers import make_provider
from server.barrier.rootkey import RootKeyProvider
from server.errors import ConfigError
from server.settings import ServerConfig


def system_key_source(config: ServerConfig) -> SystemKeySource:
    if config.systemkey.source == "local":
        return LocalKeyringSource(config.system_key_path())
    if config.systemkey.source == "remote":
        from server.barrier.remote import RemoteKeyringSource    # aiohttp only for a system-key server
        return RemoteKeyringSource(config.systemkey_client())
    raise ConfigError("systemkey.source must be 'local' or 'remote'")


async def unseal_once(barrier: Barrier, source: SystemKeySource, root: RootKeyProvider) -> None:
    ring = await source.fetch()
    keys = await ring.unwrap_all(root)
    barrier.unseal(keys, ring.current)


async def key_sources(rt) -> tuple[SystemKeySource, RootKeyProvider]:
    """The server's system-key source and root key (set at unseal; built from config for a local keyring)."""
    source, root = rt.extra.get("systemkey_source"), rt.extra.get("rootkey")
    if source is None or root is None:
        cfg = rt.config
        source = system_key_source(cfg)
        root = await asyncio.to_thread(make_provider, cfg.rootkey, cfg.root_key_path())
        rt.extra["systemkey_source"], rt.extra["rootkey"] = source, root

        async def close(_rt) -> None:
            await root.close()
            await source.close()
        rt.extra.setdefault("on_stop", []).append(close)
    return source, root


async def follow_keyring(rt, log: Any) -> None:
    """Refresh this process's keyring when another replica or worker did (`keyring_refreshed`), and after
    a `reset` (events may have been missed): without it, records sealed elsewhere under a new system-key
    version would not open here. Runs until cancelled."""
    q = rt.events.subscribe()
    try:
        while True:
            ev = await q.get()
            if ev.kind not in ("keyring_refreshed", "reset") or rt.barrier.sealed:
                continue
            try:
                source, root = await key_sources(rt)
                from server.barrier.remote import refresh_keyring
                added = await refresh_keyring(rt.barrier, source, root, log=log)
                if added:
                    log.info("keyring_followed", added=added, system_key_version=rt.barrier.current_version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep following; the next event or refresh tries again
                log.warning("keyring_follow_failed", error_type=type(e).__name__)
    finally:
        rt.events.unsubscribe(q)
