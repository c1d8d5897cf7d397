"""The key-row cache holds the keys used in the last `meta_cache_max_age` seconds, not the last
`meta_cache_entries` keys ever used: entries too old to be served are freed (the soak's memory
growth was this cache filling with one row per key written, up to 20,000 rows)."""
from __future__ import annotations

import asyncio
import time

from tests.support.server import skm  # noqa: F401


async def test_rows_too_old_to_serve_are_freed(skm, monkeypatch):  # noqa: F811
    rt = skm.rt
    project = await rt.keys.default_project()
    ks = await rt.keys.create_keystore(project.id, "bound", ip4_auth=True, actor="t")
    made = [await rt.keys.create_key(ks, "SECRET", f"s{i}", actor="t", secret_value=f"value-{i}") for i in range(40)]
    meta = rt.keys.ctx.meta
    # Each key is cached when looked up; on PostgreSQL its own creation's change event comes back through
    # LISTEN/NOTIFY and may drop it afterwards, so look them up again until those events have passed.
    for _ in range(100):
        for k in made:
            await rt.keys.key(k.id)
        if len(meta._keys) >= 40:
            break
        await asyncio.sleep(0.02)
    assert len(meta._keys) >= 40
    hot = made[-1].id
    assert (await rt.keys.key(hot)).id == hot
    later = time.monotonic() + meta.max_age + 1
    monkeypatch.setattr("server.keys.caches.time.monotonic", lambda: later)
    await rt.keys.key(hot)                         # expired: read again, and the old rows go
    assert list(meta._keys) == [hot], len(meta._keys)
    # A hit does not reorder: the cache stays oldest-first, so pruning from the front is exact.
    other = made[0].id
    await rt.keys.key(other)
    await rt.keys.key(hot)
    assert list(meta._keys) == [hot, other]
    print(f"meta cache: 40 rows -> {len(meta._keys)} after {meta.max_age:g} s")
