"""A key scheduled for deletion (or deleted, or refused by the server) is tombstoned in the sidecar's
cache: its value is gone at once and never comes back as a stale-if-error answer during an outage.
Only a key whose last known state was ACTIVE is an outage fallback."""
from __future__ import annotations

import asyncio
import json
import time

from sidecar.cache import Cache
from sidecar.events import EventStream
from sidecar.upstream import UpstreamResponse, UpstreamUnavailable
from tests.support.sidecar import unix_session

DEADLINE = 30.0


async def read(s, kid: str) -> tuple[int, dict, dict]:
    async with s.get(f"/secrets/{kid}") as r:
        return r.status, dict(r.headers), await r.json()


async def until(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.02)


async def test_a_key_scheduled_for_deletion_is_not_served_stale_when_the_server_goes_away(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "doomed", secretValue="doomed-value"))["keyId"]
    keep = (await skm.key(store, "SECRET", "kept", secretValue="kept-value"))["keyId"]
    # A long TTL and stale window: only the tombstone can explain the value not being served.
    sc = await make_sidecar(cache={"ttl": 300, "stale_if_error": 300})
    async with unix_session(sc.config.listen.socket) as s:
        for k, v in ((kid, "doomed-value"), (keep, "kept-value")):
            st, _, b = await read(s, k)
            assert st == 200 and b["body"]["secret"] == v
        seen = sc.events.received
        st, out = await skm.mgmt("POST", f"/keys/{kid}/schedule-deletion", json={})
        assert st == 200 and out["body"]["keyStatus"] == "SCHEDULED_DELETION", out
        await until(lambda: sc.events.received > seen, "the scheduling event did not arrive")
        assert sc.cache.tombstoned(kid)
        await skm.server.stop()

        st, h, b = await read(s, kid)
        assert st == 503 and b["header"]["resultMessage"] == "Service Unavailable" and b["body"] is None, (st, b)
        assert "doomed-value" not in json.dumps(b) and h.get("X-SKM-Cache") != "stale"
        # The other key, last known ACTIVE, is still there for the outage.
        sc.cache.expire_all()                       # as after missed events: only an outage fallback now
        st, h, b = await read(s, keep)
        assert st == 200 and b["body"]["secret"] == "kept-value" and h["X-SKM-Cache"] == "stale"


async def test_a_cancelled_deletion_makes_the_key_an_outage_fallback_again(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "spared", secretValue="spared-value"))["keyId"]
    sc = await make_sidecar(cache={"ttl": 300, "stale_if_error": 300})
    async with unix_session(sc.config.listen.socket) as s:
        assert (await read(s, kid))[0] == 200
        seen = sc.events.received
        assert (await skm.mgmt("POST", f"/keys/{kid}/schedule-deletion", json={}))[0] == 200
        await until(lambda: sc.events.received > seen, "the scheduling event did not arrive")
        st, _, b = await read(s, kid)
        assert st == 409 and b["body"] is None                     # the server's answer, passed through
        seen = sc.events.received
        st, out = await skm.mgmt("POST", f"/keys/{kid}/cancel-deletion", json={})
        assert st == 200, out
        await until(lambda: sc.events.received > seen, "the cancellation event did not arrive")
        assert not sc.cache.tombstoned(kid)
        st, h, b = await read(s, kid)
        assert st == 200 and b["body"]["secret"] == "spared-value" and h["X-SKM-Cache"] == "miss"
        await skm.server.stop()
        sc.cache.expire_all()
        st, h, b = await read(s, kid)
        assert st == 200 and b["body"]["secret"] == "spared-value" and h["X-SKM-Cache"] == "stale"


# ------------------------------------------------------------------ the cache's rules, one by one
class Upstream:
    """What the key server answers next (a status), or None: unreachable."""

    def __init__(self) -> None:
        self.status: int | None = 200

    def fetch(self, value: bytes):
        async def fetch() -> UpstreamResponse:
            if self.status is None:
                raise UpstreamUnavailable("no key server answered")
            return UpstreamResponse(self.status, value if self.status == 200 else b'{"header":{}}',
                                    "application/json", "u")
        return fetch


async def test_a_refusal_on_one_path_tombstones_every_cached_value_of_that_key():
    now = [0.0]
    c = Cache(ttl=10, max_entries=10, max_bytes=10_000, stale_if_error=300, clock=lambda: now[0])
    up = Upstream()
    assert (await c.get("v1.0 /secrets/k?", "k", up.fetch(b"a"))).source == "miss"
    assert (await c.get("v1.0 /secrets/k?x=1", "k", up.fetch(b"b"))).source == "miss"
    assert (await c.get("v1.0 /secrets/other?", "other", up.fetch(b"c"))).source == "miss"
    now[0] = 20.0                                          # past the TTL: only stale-if-error would serve
    up.status = 409                                        # "the key is scheduled for deletion"
    assert (await c.get("v1.0 /secrets/k?", "k", up.fetch(b""))).status == 409
    up.status = None                                       # then the outage
    for ckey in ("v1.0 /secrets/k?", "v1.0 /secrets/k?x=1"):
        try:
            res = await c.get(ckey, "k", up.fetch(b""))
        except UpstreamUnavailable:
            continue
        raise AssertionError(f"{ckey}: served {res.source} {res.body!r} for a key the server refused")
    assert (await c.get("v1.0 /secrets/other?", "other", up.fetch(b""))).source == "stale"
    # A 400 (a bad request) says nothing about the key: only that entry goes.
    up.status = 400
    assert (await c.get("v1.0 /secrets/other?y", "other", up.fetch(b""))).status == 400
    assert not c.tombstoned("other")
    # The server hands the key out again: it is ACTIVE, cached and an outage fallback once more.
    up.status = 200
    assert (await c.get("v1.0 /secrets/k?", "k", up.fetch(b"a2"))).source == "miss" and not c.tombstoned("k")
    now[0] = 40.0
    up.status = None
    assert (await c.get("v1.0 /secrets/k?", "k", up.fetch(b""))).body == b"a2"


async def test_deletion_events_tombstone_and_a_fill_racing_them_is_not_kept():
    now = [0.0]
    c = Cache(ttl=10, max_entries=10, max_bytes=10_000, stale_if_error=300, clock=lambda: now[0])
    stream = EventStream(None, c, version="v1.0")          # only its dispatch is used: no connection
    up = Upstream()
    for kind in ("key_scheduled_deletion", "key_deleted"):
        kid = kind
        await c.get(f"v1.0 /secrets/{kid}?", kid, up.fetch(b"old"))
        gate = asyncio.Event()

        async def slow() -> UpstreamResponse:               # a refill in flight while the event arrives
            await gate.wait()
            return UpstreamResponse(200, b"raced", "application/json", "u")

        now[0] += 20                                        # past the TTL: the next read refills
        task = asyncio.create_task(c.get(f"v1.0 /secrets/{kid}?", kid, slow))
        await until(lambda: kid in c._filling, "the refill did not start")
        stream._dispatch(kind, json.dumps({"key_id": kid, "keystore_id": 1}))
        assert c.peek(f"v1.0 /secrets/{kid}?") is None and c.tombstoned(kid)
        gate.set()
        assert (await task).body == b"raced"                # the answer goes to its caller...
        up.status = None
        try:                                                # ...but is neither kept nor served in the outage
            res = await c.get(f"v1.0 /secrets/{kid}?", kid, up.fetch(b""))
            raise AssertionError(f"{kind}: served {res.source} {res.body!r}")
        except UpstreamUnavailable:
            pass
        up.status = 200
