"""Disabling and enabling a key version: decrypt/verify with a disabled version is refused with NHN's
envelope and a clear detail (even when that version was loaded a moment before), enable restores it."""
from __future__ import annotations


async def _disable(skm, kid: str, v: int, **body) -> tuple[int, dict]:
    return await skm.mgmt("POST", f"/keys/{kid}/versions/{v}/disable", json=body or None)


async def test_decrypt_with_a_disabled_version_is_refused_until_it_is_enabled(skm):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SYMMETRIC_KEY", "data-key"))["keyId"]
    st, out = await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "hello"})
    assert st == 200 and out["body"]["keyVersion"] == 0
    ct0 = out["body"]["ciphertext"]
    st, _ = await skm.mgmt("POST", f"/keys/{kid}/rotate")
    assert st == 200
    # Version 0 is loaded (and cached by the server) right before it is disabled.
    st, out = await skm.client("POST", f"/symmetric-keys/{kid}/decrypt", json={"ciphertext": ct0})
    assert st == 200 and out["body"] == {"plaintext": "hello", "keyVersion": 0}

    st, out = await _disable(skm, kid, 0)
    assert st == 200 and out["body"] == {"keyId": kid, "keyVersion": 0, "status": "DISABLED", "changed": True,
                                         "forced": False, "heldBy": []}
    st, out = await skm.client("POST", f"/symmetric-keys/{kid}/decrypt", json={"ciphertext": ct0})
    assert st == 409 and out["body"] is None
    h = out["header"]
    assert h["isSuccessful"] is False and h["resultMessage"] == "Invalid Key Version Status"
    assert "version 0 is disabled" in h["resultDetail"] and f"skm key version enable {kid} 0" in h["resultDetail"]
    # The current version still works, and disabling again changes nothing.
    st, out = await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "more"})
    assert st == 200 and out["body"]["keyVersion"] == 1
    st, out = await _disable(skm, kid, 0)
    assert st == 200 and out["body"]["changed"] is False

    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/enable")
    assert st == 200 and out["body"]["status"] == "ACTIVE" and out["body"]["changed"] is True
    st, out = await skm.client("POST", f"/symmetric-keys/{kid}/decrypt", json={"ciphertext": ct0})
    assert st == 200 and out["body"]["plaintext"] == "hello"


async def test_verify_with_a_disabled_version_is_refused(skm):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "ASYMMETRIC_KEY", "signer"))["keyId"]
    st, out = await skm.client("POST", f"/asymmetric-keys/{kid}/sign", json={"plaintext": "doc"})
    assert st == 200
    sig0 = out["body"]["signature"]
    await skm.mgmt("POST", f"/keys/{kid}/rotate")
    st, _ = await _disable(skm, kid, 0)
    assert st == 200
    st, out = await skm.client("POST", f"/asymmetric-keys/{kid}/verify", json={"plaintext": "doc", "signature": sig0})
    assert st == 409 and out["header"]["resultMessage"] == "Invalid Key Version Status"
    assert "disabled" in out["header"]["resultDetail"]
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [(v["keyVersion"], v["status"]) for v in out["body"]["versions"]] == [(0, "DISABLED"), (1, "ACTIVE")]


async def test_version_changes_refuse_bad_requests_and_change_nothing(skm):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"]
    st, out = await _disable(skm, kid, 0)
    assert st == 409 and "current version" in out["header"]["resultDetail"]
    st, out = await _disable(skm, kid, 3)
    assert st == 400 and out["header"]["resultMessage"] == "Invalid Key Version"
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/3/enable")
    assert st == 400
    st, out = await _disable(skm, "0" * 32, 0)
    assert st == 404
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/disable", json={"force": "yes please"})
    assert st == 400
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/disable", headers={"Authorization": "Bearer skm_x"})
    assert st == 401
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in out["body"]["versions"]] == ["ACTIVE"]
    st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
    assert st == 200 and out["body"]["summary"] == "version 0 on 0 of 0 hosts" and out["body"]["hostList"] == []


async def test_in_an_approval_store_a_version_change_waits_for_an_approver(skm):
    store = await skm.keystore("guarded")
    kid = (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"]
    await skm.mgmt("POST", f"/keys/{kid}/rotate")
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}", json={"approvalRequired": True})
    assert st == 200, out
    # An approver independent of the admin (no lineage, as `skm server init` makes one).
    bob = await skm.rt.operators.issue_token(await skm.rt.operators.create("bob", "approver"), "test")
    st, out = await _disable(skm, kid, 0, force=True)
    assert st == 202 and out["body"]["changeRequestId"], out
    rid = out["body"]["changeRequestId"]
    st, req = await skm.mgmt("GET", f"/approvals/{rid}")
    assert st == 200 and req["body"]["operation"] == "key.version_disable"
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in out["body"]["versions"]] == ["ACTIVE", "ACTIVE"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=bob)
    assert st == 200, out
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in out["body"]["versions"]] == ["DISABLED", "ACTIVE"]
