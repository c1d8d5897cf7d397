"""The sidecar's cache against a real key server: local hits, push invalidation,
TTL fallback, singleflight, stale-if-error through an outage, the memory bound."""
from __future__ import annotations

import asyncio
import dataclasses
import time

from server.app import KeyServer
from tests.support.sidecar import server_requests, unix_session


async def read(s, kid: str, path: str = "/secrets/{}") -> tuple[int, dict, dict]:
    async with s.get(path.format(kid)) as r:
        return r.status, dict(r.headers), await r.json()


async def wait_stream(sc, state: str = "connected", timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while sc.events.state != state:
        assert time.monotonic() < end, f"event stream is {sc.events.state}, not {state}"
        await asyncio.sleep(0.02)


async def test_second_read_is_served_locally(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="hunter2"))["keyId"]
    sc = await make_sidecar()
    before = server_requests(skm.rt, "/secrets/")
    async with unix_session(sc.config.listen.socket) as s:
        st, h1, b1 = await read(s, kid)
        st2, h2, b2 = await read(s, kid)
    assert (st, st2) == (200, 200)
    assert b1["body"]["secret"] == b2["body"]["secret"] == "hunter2"
    assert h1["X-SKM-Cache"] == "miss" and h2["X-SKM-Cache"] == "hit"
    assert server_requests(skm.rt, "/secrets/") - before == 1       # counted by the key server itself
    assert sc.cache.hits == 1 and sc.cache.misses == 1


async def test_push_makes_updates_and_rotations_visible_within_a_second(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v0"))["keyId"]
    akid = (await skm.key(store, "ASYMMETRIC_KEY", "signer"))["keyId"]
    sc = await make_sidecar(cache={"ttl": 300})        # only a push can explain a change within 1 s
    await wait_stream(sc)
    async with unix_session(sc.config.listen.socket) as s:
        assert (await read(s, kid))[2]["body"]["secret"] == "v0"
        pub0 = (await read(s, akid, "/asymmetric-keys/{}/publicKey"))[2]["body"]
        assert (await read(s, kid))[1]["X-SKM-Cache"] == "hit"

        st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "v1"})
        assert st == 200
        t0 = time.monotonic()
        while (await read(s, kid))[2]["body"]["secret"] != "v1":
            assert time.monotonic() - t0 < 1.0, "secret update not seen within 1 s"
            await asyncio.sleep(0.02)

        st, _ = await skm.mgmt("POST", f"/keys/{akid}/rotate")
        assert st == 200
        t0 = time.monotonic()
        while (pub := (await read(s, akid, "/asymmetric-keys/{}/publicKey"))[2]["body"])["keyVersion"] == 0:
            assert time.monotonic() - t0 < 1.0, "rotation not seen within 1 s"
            await asyncio.sleep(0.02)
        assert pub["keyVersion"] == 1 and pub["encodedKey"] != pub0["encodedKey"]
    assert sc.events.received >= 2


async def test_with_the_stream_cut_changes_show_within_the_ttl(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v0"))["keyId"]
    sc = await make_sidecar(cache={"ttl": 1.5})
    await wait_stream(sc)
    await sc.events.stop()                             # the stream is cut: TTL alone now
    async with unix_session(sc.config.listen.socket) as s:
        assert (await read(s, kid))[2]["body"]["secret"] == "v0"
        await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "v1"})
        t0 = time.monotonic()
        _, h, b = await read(s, kid)
        assert b["body"]["secret"] == "v0" and h["X-SKM-Cache"] == "hit"   # no push: still the cached value
        while (await read(s, kid))[2]["body"]["secret"] != "v1":
            assert time.monotonic() - t0 < 1.5 + 0.5, "change not seen within the TTL"
            await asyncio.sleep(0.05)


async def test_hundred_concurrent_misses_make_one_upstream_request(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="shared"))["keyId"]
    sc = await make_sidecar()
    before = server_requests(skm.rt, "/secrets/")
    async with unix_session(sc.config.listen.socket) as s:
        results = await asyncio.gather(*(read(s, kid) for _ in range(100)))
    assert all(st == 200 and b["body"]["secret"] == "shared" for st, _, b in results)
    assert server_requests(skm.rt, "/secrets/") - before == 1
    assert sc.upstream.sent == 1


async def test_outage_serves_stale_until_the_bound_then_errors_then_recovers(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="before"))["keyId"]
    sc = await make_sidecar(cache={"ttl": 0.3, "stale_if_error": 2.0})
    port = skm.server.data_port
    async with unix_session(sc.config.listen.socket) as s:
        assert (await read(s, kid))[2]["body"]["secret"] == "before"
        fetched = time.monotonic()
        await skm.server.stop()
        await asyncio.sleep(0.4)                           # past the TTL

        st, h, b = await read(s, kid)
        assert time.monotonic() - fetched < 2.0, "the server took too long to stop for this test"
        assert st == 200 and b["body"]["secret"] == "before"
        assert h["X-SKM-Cache"] == "stale" and h["X-SKM-Stale"].startswith("true; age=")
        assert 0 <= int(h["Age"]) <= 2 and "Stale" in h["Warning"]

        await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - fetched)))
        st, h, b = await read(s, kid)
        assert st == 503
        assert b["header"]["isSuccessful"] is False and b["header"]["resultMessage"] == "Service Unavailable"
        assert "no key server answered" in b["header"]["resultDetail"]
        assert b["body"] is None

        # The key server comes back on the same address; the sidecar was never restarted.
        cfg = skm.server.config
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, port=port))
        skm.server = await KeyServer(cfg).start()
        st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "after"})
        assert st == 200
        st, h, b = await read(s, kid)
        assert st == 200 and b["body"]["secret"] == "after" and h["X-SKM-Cache"] == "miss"
        await wait_stream(sc, timeout=10)                  # and push is back too
        st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "pushed"})
        t0 = time.monotonic()
        while (await read(s, kid))[2]["body"]["secret"] != "pushed":
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.02)


async def test_memory_stays_within_the_cache_bound(skm, store, make_sidecar):
    bound = 64 * 1024
    sc = await make_sidecar(cache={"max_bytes": bound, "max_entries": 1000, "ttl": 300})
    kids = [(await skm.key(store, "SECRET", f"s{i}", secretValue=f"{i:04d}" + "x" * 3000))["keyId"]
            for i in range(80)]                            # ~250 KB of values, four times the bound
    peak = 0
    async with unix_session(sc.config.listen.socket) as s:
        for i, kid in enumerate(kids):
            st, _, b = await read(s, kid)
            assert st == 200 and b["body"]["secret"].startswith(f"{i:04d}")
            held = sum(len(e.body) for e in sc.cache._entries.values())
            peak = max(peak, held, sc.cache.bytes)
            assert sc.cache.bytes <= bound and held <= bound
        async with s.get("/v1/status") as r:
            stats = (await r.json())["cache"]
        # The most recent reads are still cached (LRU): a hit, no upstream request.
        assert (await read(s, kids[-1]))[1]["X-SKM-Cache"] == "hit"
        assert (await read(s, kids[0]))[1]["X-SKM-Cache"] == "miss"
    assert stats["bytes"] <= bound and 0 < stats["entries"] < len(kids)
    assert peak > bound // 2                               # the bound was actually reached
