"""The data-plane usage rollup: counted on the hot path, flushed by adding, compacted, served by API and metrics."""
from __future__ import annotations

import time

from server.usage import Usage, UsageSettings


async def _read(skm, key_id: str, session=None):
    return await skm.client("GET", f"/secrets/{key_id}", session=session)


async def test_requests_and_denials_are_counted_per_store_and_key(skm):
    open_store = await skm.keystore("open")
    shut_store = await skm.keystore("shut", register_loopback=False)   # 127.0.0.1 not registered: denied
    a = await skm.key(open_store, "SECRET", "a", secretValue="x")
    b = await skm.key(shut_store, "SECRET", "b", secretValue="y")
    for _ in range(3):
        st, _out = await _read(skm, a["keyId"])
        assert st == 200
    for _ in range(2):
        st, _out = await _read(skm, b["keyId"])
        assert st == 403
    usage = skm.rt.extra["usage"]
    await usage.flush()

    st, out = await skm.mgmt("GET", f"/usage?keyStoreId={open_store['keyStoreId']}&range=hour")
    assert st == 200, out
    assert out["body"]["totals"] == {"ok": 3, "denied": 0, "error": 0}
    assert len(out["body"]["buckets"]) == 60 and out["body"]["bucketMinutes"] == 1
    st, out = await skm.mgmt("GET", f"/usage?keyId={b['keyId']}&range=day")
    assert st == 200 and out["body"]["totals"]["denied"] == 2 and out["body"]["keyStoreId"] == shut_store["keyStoreId"]
    st, out = await skm.mgmt("GET", "/usage?range=month")
    assert st == 200 and out["body"]["totals"]["ok"] == 3 and len(out["body"]["buckets"]) == 30

    # Bad input: a clear 4xx, no change.
    for q in ("range=year", "keyStoreId=abc", "keyId=zz", "keyStoreId=999999"):
        st, out = await skm.mgmt("GET", f"/usage?{q}")
        assert 400 <= st < 500, (q, st, out)

    # /metrics: a counter per key store and result, no key label.
    s = skm._default()
    async with s.get(f"{skm.data_url}/metrics") as r:
        text = await r.text()
    line = f'skm_keystore_requests_total{{keystore="{shut_store["keyStoreId"]}",result="denied"}} 2.0'
    assert line in text
    assert b["keyId"] not in text

    # The audit names the read as usage.read.
    recs = await skm.rt.audit.query(action="usage.read")
    assert recs and recs[-1]["change"] is False


async def test_flushes_add_and_old_minutes_become_hours(skm):
    """Two counters (two workers or replicas) flushing the same minute add up; compaction keeps the totals."""
    db = skm.rt.storage
    one, two = Usage(db, UsageSettings()), Usage(db, UsageSettings())
    now = time.time()
    three_days_ago = now - 3 * 86400
    for u in (one, two):
        u.count(7, "k" * 32, "ok", now=now)
        u.count(7, "k" * 32, "ok", now=three_days_ago)
        u.count(7, "k" * 32, "denied", now=three_days_ago + 60)
    assert await one.flush() == 3 and await two.flush() == 3
    assert await one.flush() == 0        # nothing pending twice
    rows = await db.fetchall("SELECT span, count FROM usage_minutes WHERE keystore_id = 7 ORDER BY minute")
    assert [(r["span"], r["count"]) for r in rows] == [(1, 2), (1, 2), (1, 2)]

    await one.compact(now=now)
    rows = await db.fetchall("SELECT span, result, count FROM usage_minutes WHERE keystore_id = 7 "
                             "ORDER BY span, result")
    assert [(r["span"], r["result"], r["count"]) for r in rows] == [(1, "ok", 2), (60, "denied", 2), (60, "ok", 2)]
    month = await one.series(range_="month", keystore_id=7, now=now)
    assert month["totals"] == {"ok": 4, "denied": 2, "error": 0}
    # Past the hour rows' life they go too.
    await one.compact(now=now + 40 * 86400)
    assert await db.fetchval("SELECT COUNT(*) FROM usage_minutes WHERE keystore_id = 7") == 0
    await db.execute("DELETE FROM usage_minutes WHERE keystore_id = 7")
