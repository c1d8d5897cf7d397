"""Roll-out holdings do not grow without end: a purged key's rows go with it, a host silent past the retention
goes at the next job run, a host still reporting stays."""
from __future__ import annotations

import datetime as dt

from server import timeutil
from server.app import run_jobs_once
from server.keys import rollout


def _host(n: int) -> rollout.Host:
    return rollout.Host(fingerprint=f"{n:064x}", name=f"host-{n}", mac=None)


async def test_silent_hosts_and_purged_keys_leave_no_holdings(skm):
    store = await skm.keystore("holdings")
    kid = (await skm.key(store, "SECRET", "h", secretValue="v"))["keyId"]
    other = (await skm.key(store, "SECRET", "o", secretValue="w"))["keyId"]
    rt = skm.rt
    project = (await rt.keys.keystore(store["keyStoreId"])).project_id
    for n in (1, 2):
        await rollout.record(rt.storage, project, _host(n), [rollout.Ack(kid, 1, None, None),
                                                             rollout.Ack(other, 1, None, None)], ttl=60)
    assert {h.host for h in await rollout.holdings(rt.storage, kid)} == {"host-1", "host-2"}

    # Host 2 keeps reporting for 40 days; host 1 went away after its first report.
    later = timeutil.now() + dt.timedelta(days=40)
    await rt.storage.execute("UPDATE key_holdings SET acked_at = ? WHERE host_fp = ?",
                             timeutil.to_db(later - dt.timedelta(minutes=1)), _host(2).fingerprint)
    out = await run_jobs_once(rt, later)
    assert out["holdings_pruned"] == 2                       # host 1's two keys
    assert [h.host for h in await rollout.holdings(rt.storage, kid)] == ["host-2"]

    # A purged key takes its holdings with it.
    st, out = await skm.mgmt("POST", f"/keys/{other}/schedule-deletion", json={})
    assert st == 200, out
    st, out = await skm.mgmt("DELETE", f"/keys/{other}")
    assert st == 200, out
    assert await rollout.holdings(rt.storage, other) == []
    assert [h.host for h in await rollout.holdings(rt.storage, kid)] == ["host-2"]
