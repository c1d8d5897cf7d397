"""The LISTEN/NOTIFY relay on its own: local delivery goes through the database, a publish
while the database is down still reaches local subscribers, and after the channel was
silent every subscriber gets one `reset` (it may have missed changes made elsewhere)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from server.events import Event, EventBus
from server.replication import enable
from server.storage.factory import open_storage


async def _next(q: asyncio.Queue, timeout: float = 10.0) -> Event:
    return await asyncio.wait_for(q.get(), timeout)


async def test_sqlite_needs_no_relay(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'skm.db'}")
    await storage.open()
    try:
        rt = SimpleNamespace(storage=storage, events=EventBus(), extra={})
        assert await enable(rt) is None and rt.events.relay is None
    finally:
        await storage.close()


async def test_relay_across_two_runtimes_and_a_database_outage(pg_cluster, pg_url):
    opened = []
    runtimes = []
    for _ in range(2):
        s = open_storage(pg_url)
        await s.open()
        opened.append(s)
        rt = SimpleNamespace(storage=s, events=EventBus(), extra={})
        assert await enable(rt, heartbeat=0.2) is not None
        runtimes.append(rt)
    one, two = runtimes
    q1, q2 = one.events.subscribe(), two.events.subscribe()
    try:
        ev = Event(7, "secret_updated", "a" * 32, 3)
        await one.events.publish(ev)
        assert await _next(q1) == ev and await _next(q2) == ev     # each exactly once
        await asyncio.sleep(0.3)
        assert q1.empty() and q2.empty()

        await pg_cluster.stop_async("immediate")
        down = Event(7, "key_created", "b" * 32, 0)
        await one.events.publish(down)                 # NOTIFY fails: still told locally
        assert await _next(q1) == down
        await pg_cluster.start_async()
        # Both noticed the silence (or the failed NOTIFY) and reset their subscribers once.
        assert (await _next(q1, 20)).kind == "reset"
        assert (await _next(q2, 20)).kind == "reset"
        again = Event(7, "key_rotated", "c" * 32, 1)
        await two.events.publish(again)
        assert await _next(q1) == again and await _next(q2) == again
    finally:
        for rt in runtimes:
            for hook in rt.extra.get("on_stop", []):
                await hook(rt)
        for s in opened:
            await s.close()
