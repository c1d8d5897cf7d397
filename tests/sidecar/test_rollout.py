"""Rotation roll-out seen from the key server: two sidecar hosts acknowledge the versions they hold,
one is stopped and goes stale (and still blocks), comes back and reports what it holds, and disabling
the old version waits for the hosts (or is forced)."""
from __future__ import annotations

import asyncio
import json
import time

from sidecar.app import Sidecar
from tests.support.cli import skm_cli
from tests.support.sidecar import unix_session

FAST = {"acks": {"ttl": 2}, "reads": {"flush_interval": 0.1}}


async def read_secret(sc, kid: str) -> str:
    async with unix_session(sc.config.listen.socket) as s:
        async with s.get(f"/secrets/{kid}") as r:
            assert r.status == 200, await r.text()
            return (await r.json())["body"]["secret"]


async def until(check, what: str, timeout: float = 10.0):
    """Poll `check()` (async, returns a truthy value when done) within a bounded deadline."""
    end = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def rollout(skm, kid: str) -> dict:
    st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
    assert st == 200, out
    return out["body"]


def hosts(r: dict) -> dict[str, dict]:
    return {h["host"]: h for h in r["hostList"]}


async def test_rollout_shows_each_host_a_stopped_one_goes_stale_and_disable_waits_for_it(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db-password", secretValue="first"))["keyId"]
    a = await make_sidecar("host-a", **FAST)
    b = await make_sidecar("host-b", **FAST)
    assert await read_secret(a, kid) == "first" and await read_secret(b, kid) == "first"

    async def both_on(v):
        r = await rollout(skm, kid)
        hs = hosts(r)
        return r if {n: h["version"] for n, h in hs.items()} == {"host-a-host": v, "host-b-host": v} else None
    r = await until(lambda: both_on(0), "both hosts to acknowledge version 0")
    assert r["summary"] == "version 0 on 2 of 2 hosts" and r["staleHosts"] == 0
    h = hosts(r)["host-a-host"]
    assert h["fingerprint"] and h["ackDatetime"] and h["deliveredDatetime"] and h["stale"] is False
    assert h["reloadOk"] is None and h["ttlSeconds"] == 2

    st, out = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "second"})
    assert st == 200 and out["body"]["currentKeyValueVersion"] == 1
    # Host A's cache was dropped by the push event: its next read delivers version 1.
    await until(lambda: _is(read_secret(a, kid), "second"), "host A to deliver the new value")

    async def a_on_1():
        r = await rollout(skm, kid)
        hs = hosts(r)
        return r if hs["host-a-host"]["version"] == 1 and hs["host-b-host"]["version"] == 0 else None
    r = await until(a_on_1, "host A to acknowledge version 1")
    assert r["summary"] == "version 1 on 1 of 2 hosts"
    assert r["versions"] == [{"version": 1, "hosts": 1}, {"version": 0, "hosts": 1}]

    # Host B still reports version 0: disabling it would cut B's apps off.
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/disable")
    assert st == 409 and out["header"]["isSuccessful"] is False
    assert "host-b-host" in out["header"]["resultDetail"] and "--force" in out["header"]["resultDetail"]
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/1/disable")
    assert st == 409 and "current version" in out["header"]["resultDetail"]
    st, key = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in key["body"]["versions"]] == ["ACTIVE", "ACTIVE"]     # nothing changed

    # Host B stops: once silent past its TTL it is shown stale.
    b_config = b.config
    await b.stop()

    async def b_stale():
        r = await rollout(skm, kid)
        return r if hosts(r)["host-b-host"]["stale"] else None
    r = await until(b_stale, "host B to be marked stale")
    assert r["summary"] == "version 1 on 1 of 2 hosts (1 stale)" and r["staleHosts"] == 1
    assert hosts(r)["host-a-host"]["stale"] is False and hosts(r)["host-b-host"]["version"] == 0

    # The CLI shows the same.
    code, out, err = await skm_cli(skm, "key", "rollout", kid)
    assert code == 0, err
    assert "version 1 on 1 of 2 hosts (1 stale)" in out and "host-b-host" in out and "STALE" in out
    code, out, err = await skm_cli(skm, "key", "rollout", kid, "--json")
    assert code == 0 and json.loads(out)["hostsOnCurrent"] == 1

    # Silence is not proof that B stopped serving version 0 (it may be cut off): the disable still waits.
    code, out, err = await skm_cli(skm, "key", "version", "disable", kid, "0")
    assert code != 0 and "host-b-host (stale)" in err and "--force" in err, err
    st, key = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in key["body"]["versions"]] == ["ACTIVE", "ACTIVE"]     # nothing changed

    # Host B comes back (same certificate) with an empty cache: its first report says it holds nothing,
    # which replaces what its previous run held, before any app reads through it.
    b2 = await Sidecar(b_config).start()
    try:
        async def b_gone():
            r = await rollout(skm, kid)
            return r if set(hosts(r)) == {"host-a-host"} else None
        r = await until(b_gone, "host B's restart to clear what its previous run held")
        assert r["summary"] == "version 1 on 1 of 1 host"
        # An app reads through B: it acknowledges version 1.
        assert await read_secret(b2, kid) == "second"
        r = await until(lambda: both_on(1), "host B to acknowledge version 1 after its restart")
        assert r["summary"] == "version 1 on 2 of 2 hosts"
        code, out, err = await skm_cli(skm, "key", "version", "disable", kid, "0", "--json")
        assert code == 0, err
        assert json.loads(out) == {"keyId": kid, "keyVersion": 0, "status": "DISABLED", "changed": True,
                                   "forced": False, "heldBy": []}
        st, key = await skm.mgmt("GET", f"/keys/{kid}")
        assert [v["status"] for v in key["body"]["versions"]] == ["DISABLED", "ACTIVE"]
        code, out, err = await skm_cli(skm, "key", "version", "enable", kid, "0", "--json")
        assert code == 0 and json.loads(out)["status"] == "ACTIVE"
    finally:
        await b2.stop()


async def _is(coro, value) -> bool:
    return (await coro) == value


async def test_force_disables_a_version_a_host_holds_and_is_audited_as_forced(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "api-token", secretValue="old"))["keyId"]
    a = await make_sidecar("holder", **FAST)
    assert await read_secret(a, kid) == "old"
    await until(lambda: _holds(skm, kid, 0), "the host to acknowledge version 0")
    st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "new"})
    assert st == 200

    code, _, err = await skm_cli(skm, "key", "version", "disable", kid, "0")
    assert code == 5 and "holder-host" in err and "--force" in err
    code, out, err = await skm_cli(skm, "key", "version", "disable", kid, "0", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["forced"] is True and json.loads(out)["heldBy"] == ["holder-host"]
    st, out = await skm.mgmt("GET", "/audit", params={"keyId": kid, "action": "key.version-disable"})
    assert st == 200
    results = [(r["result"], r["detail"].get("force")) for r in out["body"]["records"]]
    assert results == [("refused", None), ("ok", True)]


async def _holds(skm, kid: str, version: int) -> bool:
    r = await rollout(skm, kid)
    return bool(r["hostList"]) and all(h["version"] == version for h in r["hostList"])


async def test_another_holder_plugs_in_and_its_reload_result_and_oldest_version_are_reported(
        skm, store, make_sidecar):
    """What sidecar/render.py does: add a holdings source; the host reports the oldest version any source
    holds (the one a disable must wait for) and whether the reload after rendering it succeeded."""
    kid = (await skm.key(store, "SECRET", "rendered", secretValue="one"))["keyId"]
    st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": "two"})
    assert st == 200
    sc = await make_sidecar("renderer", **FAST)
    assert await read_secret(sc, kid) == "two"                      # the reads source holds version 1
    rendered = [(kid, 0, time.time(), False)]                          # a template still holds 0; reload failed
    sc.acks.add_source(lambda: rendered)

    async def reported():
        r = await rollout(skm, kid)
        return r if r["hostList"] and r["hostList"][0]["version"] == 0 else None
    r = await until(reported, "the rendered holding to be reported")
    h = r["hostList"][0]
    assert h["reloadOk"] is False and r["summary"] == "version 1 on 0 of 1 host"
    rendered[:] = [(kid, 1, time.time(), True)]
    sc.acks.poke()

    async def moved():
        r = await rollout(skm, kid)
        return r if r["hostList"][0]["version"] == 1 and r["hostList"][0]["reloadOk"] is True else None
    r = await until(moved, "the re-rendered holding to be reported")
    assert r["summary"] == "version 1 on 1 of 1 host"
    async with unix_session(sc.config.listen.socket) as s:
        async with s.get("/v1/status") as resp:
            status = await resp.json()
    assert status["acks"]["keys"] == 1 and status["acks"]["reportsSent"] >= 2 and status["acks"]["lastError"] is None
    assert status["reads"]["shipped"] >= 1 and status["reads"]["spooled"] == 0
