"""DELETE /api/v1/keystores/{id}: only an empty store; with its auth data; through approval when the store has it."""
from __future__ import annotations

from tests.access.helpers import access_key, issue_cert, v12_headers
from tests.access.test_approvals import _approval_store, _operator


async def _count(skm, table: str, store_id: int) -> int:
    return int(await skm.rt.storage.fetchval(f"SELECT COUNT(*) AS n FROM {table} WHERE keystore_id = ?", store_id))


async def test_a_store_with_keys_is_refused_then_an_empty_one_goes_with_its_auth_data(skm):
    store = await skm.keystore("doomed", macAuthUse="Y", certificateAuthUse="Y", authMode="OR")
    sid = store["keyStoreId"]
    st, _ = await skm.mgmt("POST", f"/keystores/{sid}/auths/macs", json={"value": "02:00:00:00:00:01"})
    assert st == 201
    await issue_cert(skm, store, "host1")
    kid = (await skm.key(store, "SYMMETRIC_KEY", "aes"))["keyId"]

    # Active key: 409, nothing changes.
    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 409 and "still holds 1 key:" in out["header"]["resultDetail"], out
    # Scheduled for deletion is not deleted yet: still 409, and it says so.
    st, _ = await skm.mgmt("POST", f"/keys/{kid}/schedule-deletion")
    assert st == 200
    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 409 and "scheduled for deletion counts" in out["header"]["resultDetail"], out
    assert (await skm.mgmt("GET", f"/keystores/{sid}"))[0] == 200
    assert await _count(skm, "auth_ipv4s", sid) == 1 and await _count(skm, "auth_certificates", sid) == 1

    # Non-admins may not delete.
    viewer = await _operator(skm, "vic", "viewer")
    st, _ = await skm.mgmt("DELETE", f"/keystores/{sid}", token=viewer)
    assert st == 403

    st, _ = await skm.mgmt("DELETE", f"/keys/{kid}")
    assert st == 200
    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 200 and out["body"]["keyStoreId"] == sid and out["body"]["name"] == "doomed", out
    st, out = await skm.mgmt("GET", f"/keystores/{sid}")
    assert st == 404
    for table in ("auth_ipv4s", "auth_macs", "auth_certificates", "change_requests"):
        assert await _count(skm, table, sid) == 0, table
    # The client API's inventory no longer shows it, and the name can be used again.
    key_id, secret = await access_key(skm)
    st, out = await skm.client("GET", "/keystores", version="v1.2", headers=v12_headers(key_id, secret))
    assert st == 200 and out["body"]["keyStoreIdList"] == [], out
    again = await skm.keystore("doomed")
    assert again["keyStoreId"] != sid
    # Audited under its semantic name.
    st, out = await skm.mgmt("GET", "/audit?action=keystore.delete")
    assert [(r["result"], r["keyStoreId"]) for r in out["body"]["records"]][-1] == ("ok", sid)
    # A store that does not exist: 404.
    st, _ = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 404


async def test_an_approval_store_is_deleted_by_an_approved_change_request(skm):
    approver = await _operator(skm, "ann", "approver")
    store = await _approval_store(skm, "guarded")
    sid = store["keyStoreId"]
    # An earlier, decided request on the store: its history goes with the store (the audit log keeps it).
    st, out = await skm.mgmt("PATCH", f"/keystores/{sid}", json={"description": "x"})
    assert st == 202
    st, _ = await skm.mgmt("POST", f"/approvals/{out['body']['changeRequestId']}/deny", token=approver)
    assert st == 200

    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 202 and out["header"]["resultMessage"] == "Approval Required", out
    rid = out["body"]["changeRequestId"]
    assert (await skm.mgmt("GET", f"/keystores/{sid}"))[0] == 200       # nothing happens before approval
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["operation"] == "keystore.delete" and cr["body"]["diff"]["target"]["keyStoreName"] == "guarded"

    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver, json={"comment": "ok"})
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    assert out["body"]["changeRequestId"] == rid and out["body"]["approvals"][0]["operator"] == "ann"
    assert (await skm.mgmt("GET", f"/keystores/{sid}"))[0] == 404
    assert await _count(skm, "change_requests", sid) == 0
    st, out = await skm.mgmt("GET", "/audit?action=approval.applied")
    assert [r["detail"]["changeRequestId"] for r in out["body"]["records"]] == [rid]


async def test_a_store_that_gains_a_key_before_approval_is_not_deleted(skm):
    approver = await _operator(skm, "bea", "approver")
    store = await _approval_store(skm, "busy")
    sid = store["keyStoreId"]
    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/keystores/{sid}/keys", json={"keyType": "SYMMETRIC_KEY", "name": "k"})
    st, _ = await skm.mgmt("POST", f"/approvals/{out['body']['changeRequestId']}/approve", token=approver)
    assert st == 200
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver)
    assert st == 200 and out["body"]["status"] == "FAILED" and "still holds 1 key:" in out["body"]["reason"]
    assert (await skm.mgmt("GET", f"/keystores/{sid}"))[0] == 200
