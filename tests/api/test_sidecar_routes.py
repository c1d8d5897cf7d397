"""The key server's sidecar routes (acks, read reports): host certificate required, project and key-store
checks per record, bounded batches, bad input refused with nothing changed, apps cannot reach them."""
from __future__ import annotations

import time

from tests.support.sidecar import issue_host_cert, register_certificate, start_sidecar, unix_session

MAC = "02:00:5e:10:00:01"


async def _host(skm, store, name: str = "edge-1", macs: list[str] | None = None):
    host = issue_host_cert(skm.pki.load_ca(), skm.tmp, name, macs=macs)
    await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, name)
    return host, skm.session(host.cert, host.key, headers={"X-TOAST-CLIENT-MAC-ADDR": MAC} if macs else None)


def _read(kid: str, **kw) -> dict:
    return {"keyId": kid, "what": "secret", "version": 0, "uid": 1000, "pid": 42, "exe": "/usr/bin/app",
            "source": "cache", "readAt": time.time(), **kw}


async def _sidecar_records(skm) -> list[dict]:
    st, out = await skm.mgmt("GET", "/audit", params={"plane": "sidecar", "limit": "1000"})
    assert st == 200
    return out["body"]["records"]


async def test_a_host_certificate_is_required(skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    for path, body in (("/sidecar/acks", {"ttl": 60, "holdings": [{"keyId": kid, "version": 0}]}),
                       ("/sidecar/reads", {"batchId": "ab" * 8, "reads": [_read(kid)]})):
        st, out = await skm.client("POST", path, json=body)
        assert st == 403 and out["header"]["resultMessage"] == "Certificate Auth Failure", out
        assert "host certificate" in out["header"]["resultDetail"]
    # A certificate of this CA that no key store of the project admits is refused too.
    stranger = issue_host_cert(skm.pki.load_ca(), skm.tmp, "stranger")
    s = skm.session(stranger.cert, stranger.key)
    st, out = await skm.client("POST", "/sidecar/reads", session=s, json={"batchId": "cd" * 8, "reads": [_read(kid)]})
    assert st == 403 and out["header"]["resultMessage"] == "Certificate Auth Failure"
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={"ttl": 60, "holdings": []})
    assert st == 403
    assert await _sidecar_records(skm) == []
    st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
    assert out["body"]["hostList"] == []


async def test_acks_record_the_host_name_and_its_attested_mac(skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    _, s = await _host(skm, store, "edge-1", macs=[MAC])
    delivered = time.time() - 5
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={
        "ttl": 60, "holdings": [{"keyId": kid, "version": 0, "deliveredAt": delivered, "reloadOk": False}]})
    assert st == 200 and out["body"] == {"accepted": 1, "refused": [], "duplicate": False}
    st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
    [h] = out["body"]["hostList"]
    assert (h["host"], h["mac"], h["version"], h["reloadOk"], h["stale"], h["ttlSeconds"]) == \
        ("edge-1", MAC, 0, False, False, 60)
    assert out["body"]["summary"] == "version 0 on 1 of 1 host"
    # A version the key does not have yet is refused, and changes nothing.
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={
        "ttl": 60, "holdings": [{"keyId": kid, "version": 5}]})
    assert st == 400 and "has no version 5" in out["header"]["resultDetail"]
    st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
    assert out["body"]["hostList"][0]["version"] == 0


async def test_records_for_another_projects_key_are_refused(skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    mine = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    other = await skm.rt.keys.create_project("other-team")
    st, out = await skm.mgmt("POST", "/keystores", json={"name": "theirs", "ip4AuthUse": "Y",
                                                         "appkey": other.appkey})
    assert st == 201, out
    theirs = (await skm.key(out["body"], "SECRET", "their-db", secretValue="y"))["keyId"]
    _, s = await _host(skm, store)

    st, out = await skm.client("POST", "/sidecar/reads", session=s,
                               json={"batchId": "01" * 8, "reads": [_read(theirs)]})
    assert st == 404 and out["header"]["resultMessage"] == "Invalid Key Id"
    assert await _sidecar_records(skm) == []

    st, out = await skm.client("POST", "/sidecar/reads", session=s,
                               json={"batchId": "02" * 8, "reads": [_read(mine), _read(theirs), _read(mine, uid=7)]})
    assert st == 200 and out["body"]["accepted"] == 2
    assert out["body"]["refused"] == [{"index": 1, "reason": "Invalid Key Id: no key with that id"}]
    recs = await _sidecar_records(skm)
    assert [(r["keyId"], r["detail"]["uid"]) for r in recs] == [(mine, 1000), (mine, 7)]
    assert {r["actor"] for r in recs} == {"edge-1"}
    # The same batch again (a retry after a lost answer) is not appended twice.
    st, out = await skm.client("POST", "/sidecar/reads", session=s,
                               json={"batchId": "02" * 8, "reads": [_read(mine), _read(mine, uid=7)]})
    assert st == 200 and out["body"]["duplicate"] is True
    assert len(await _sidecar_records(skm)) == 2
    # Acks for their key: refused as well.
    st, out = await skm.client("POST", "/sidecar/acks", session=s,
                               json={"ttl": 60, "holdings": [{"keyId": theirs, "version": 0}]})
    assert st == 404
    st, out = await skm.mgmt("GET", f"/keys/{theirs}/rollout")
    assert out["body"]["hostList"] == []


async def test_bad_batches_are_refused_whole(skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    _, s = await _host(skm, store)
    bad = [
        {"batchId": "03" * 8, "reads": [_read(kid)] * 1001},                        # over the batch bound
        {"batchId": "04" * 8, "reads": [_read(kid, source="disk")]},                  # unknown source
        {"batchId": "05" * 8, "reads": [_read(kid), _read(kid, readAt=1.0)]},         # a broken clock
        {"batchId": "06" * 8, "reads": [_read(kid, exe="x" * 600)]},                  # over the field bound
        {"batchId": "zz", "reads": [_read(kid)]},                                     # a malformed batch id
        {"batchId": "07" * 8, "reads": [{**_read(kid), "secret": "leak"}]},           # unknown field
    ]
    for body in bad:
        st, out = await skm.client("POST", "/sidecar/reads", session=s, json=body)
        assert st in (400, 413), (st, out)
        assert out["header"]["isSuccessful"] is False and out["header"].get("resultDetail")
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={"ttl": 1, "holdings": []})
    assert st == 400 and "ttl" in out["header"]["resultDetail"]
    assert await _sidecar_records(skm) == []


async def test_apps_cannot_post_reports_through_the_sidecar(skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    sc, host = await start_sidecar(skm, "guard", reads={"enabled": False}, acks={"enabled": False})
    try:
        await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, "guard")
        async with unix_session(sc.config.listen.socket) as s:
            for path in ("/sidecar/reads", f"/keymanager/v1.0/appkey/{skm.appkey}/sidecar/acks"):
                async with s.post(path, json={"batchId": "08" * 8, "reads": [_read(kid)]}) as r:
                    assert r.status == 404, await r.text()
        assert await _sidecar_records(skm) == []
    finally:
        await sc.stop()


async def test_a_complete_report_replaces_what_the_host_held(skm):
    """`complete`: the report is all the host holds, so its rows for other keys go; a refused holding's
    row stays (a refusal is not the host saying it dropped the key); other hosts are untouched."""
    store = await skm.keystore("apps", certificateAuthUse="Y")
    k1, k2, k3 = [(await skm.key(store, "SECRET", f"db{i}", secretValue="x"))["keyId"] for i in (1, 2, 3)]
    _, s = await _host(skm, store, "edge-1")
    _, other = await _host(skm, store, "edge-2")
    for sess in (s, other):
        st, out = await skm.client("POST", "/sidecar/acks", session=sess, json={
            "ttl": 60, "holdings": [{"keyId": k, "version": 0} for k in (k1, k2, k3)]})
        assert st == 200 and out["body"]["accepted"] == 3, out

    async def hosts_of(kid):
        st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
        assert st == 200, out
        return sorted(h["host"] for h in out["body"]["hostList"])

    # edge-1 now holds k1 only; its holding of k3 names a version k3 does not have (refused).
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={
        "ttl": 60, "complete": True, "holdings": [{"keyId": k1, "version": 0}, {"keyId": k3, "version": 7}]})
    assert st == 200 and out["body"]["accepted"] == 1 and len(out["body"]["refused"]) == 1, out
    assert await hosts_of(k1) == ["edge-1", "edge-2"]
    assert await hosts_of(k2) == ["edge-2"]                  # dropped for edge-1
    assert await hosts_of(k3) == ["edge-1", "edge-2"]        # refused in the report: kept
    # An empty complete report: edge-1 holds nothing any more.
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={"ttl": 60, "complete": True,
                                                                        "holdings": []})
    assert st == 200, out
    assert [await hosts_of(k) for k in (k1, k2, k3)] == [["edge-2"]] * 3
    # Without `complete`, a report only adds (a sidecar holding more than one request's worth).
    st, out = await skm.client("POST", "/sidecar/acks", session=s, json={"ttl": 60, "holdings": [
        {"keyId": k2, "version": 0}]})
    assert st == 200 and await hosts_of(k2) == ["edge-1", "edge-2"] and await hosts_of(k1) == ["edge-2"]
