"""The approval workflow end to end through the management API of a real server."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json

from aiohttp import web

from server import timeutil
from server.errors import ApprovalUnavailable, Conflict
from server.events import Event
from tests.support.loopback import serve


async def _operator(skm, name: str, role: str) -> str:
    """An operator with no lineage (as `skm server init` makes one): independent of the admin whose
    requests it decides. One the admin created through the API would not count (tests/access/test_sod.py)."""
    op = await skm.rt.operators.create(name, role)
    return await skm.rt.operators.issue_token(op, "test")


async def _approval_store(skm, name: str = "guarded", needed: int = 1) -> dict:
    store = await skm.keystore(name)        # registers 127.0.0.1 before approval is on
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}",
                             json={"approvalRequired": True, "approvalsNeeded": needed})
    assert st == 200 and out["body"]["approvalRequired"] is True, out
    return out["body"]


async def test_create_key_waits_for_an_approver_then_exists(skm):
    approver = await _operator(skm, "alice", "approver")
    store = await _approval_store(skm)
    q = skm.rt.events.subscribe()
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "db-pw", "secretValue": "hunter2-very-secret"})
    assert st == 202 and out["header"]["resultMessage"] == "Approval Required", out
    rid = out["body"]["changeRequestId"]
    # No key yet; one pending request whose diff masks the secret.
    st, keys = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys")
    assert keys["body"]["keyList"] == []
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["status"] == "PENDING" and cr["body"]["requestedBy"] == "admin"
    assert "hunter2-very-secret" not in json.dumps(cr)
    assert {"field": "secret_value", "from": None, "to": "********"} in cr["body"]["diff"]["changes"]
    assert {"field": "name", "from": None, "to": "db-pw"} in cr["body"]["diff"]["changes"]
    # The secret is sealed in the database, not in the params JSON.
    row = await skm.rt.storage.fetchone("SELECT params, secrets_sealed FROM change_requests WHERE id = ?", rid)
    assert "hunter2" not in row["params"] and row["secrets_sealed"] is not None
    assert b"hunter2" not in bytes(row["secrets_sealed"])
    ev = await asyncio.wait_for(q.get(), 2)
    assert ev == Event(store["keyStoreId"], "approval_requested")
    # The requester cannot approve; an admin is not an approver either.
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve")
    assert st == 403 and "approver" in out["header"]["resultDetail"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver, json={"comment": "ok"})
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    key_id = out["body"]["result"]["keyId"]
    key = await skm.rt.keys.key(key_id)
    assert await skm.rt.keys.secret_value(key) == "hunter2-very-secret"
    assert out["body"]["approvals"][0]["operator"] == "alice"
    row = await skm.rt.storage.fetchone("SELECT secrets_sealed FROM change_requests WHERE id = ?", rid)
    assert row["secrets_sealed"] is None        # wiped once decided
    # Decided requests stay decided.
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver)
    assert st == 409


async def test_requester_can_never_approve_even_as_approver(skm):
    await _operator(skm, "bob", "approver")
    store = await _approval_store(skm)
    # An approver who also got the admin role later: their own request is still not theirs to approve.
    dual = await _operator(skm, "carol", "admin")
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", token=dual,
                             json={"keyType": "SYMMETRIC_KEY", "name": "aes"})
    rid = out["body"]["changeRequestId"]
    st, _ = await skm.mgmt("PATCH", "/operators/carol", json={"role": "approver"})
    assert st == 200
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=dual)
    assert st == 403 and "own" in out["header"]["resultDetail"]


async def test_deny_and_cancel(skm):
    approver = await _operator(skm, "dave", "approver")
    store = await _approval_store(skm)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "a"})
    denied = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "b"})
    cancelled = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{denied}/deny", token=approver, json={"comment": "not now"})
    assert st == 200 and out["body"]["status"] == "DENIED" and out["body"]["reason"] == "not now"
    # Only the requester cancels.
    st, out = await skm.mgmt("POST", f"/approvals/{cancelled}/cancel", token=approver)
    assert st == 403
    st, out = await skm.mgmt("POST", f"/approvals/{cancelled}/cancel")
    assert st == 200 and out["body"]["status"] == "CANCELLED"
    for rid in (denied, cancelled):
        st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver)
        assert st == 409
    st, keys = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys")
    assert keys["body"]["keyList"] == []
    st, out = await skm.mgmt("GET", "/approvals?status=denied")
    assert [c["changeRequestId"] for c in out["body"]["changeRequests"]] == [denied]


async def test_expiry(skm):
    approver = await _operator(skm, "erin", "approver")
    store = await _approval_store(skm)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "late"})
    rid = out["body"]["changeRequestId"]
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    created = timeutil.from_db(timeutil.to_db(dt.datetime.strptime(cr["body"]["creationDatetime"],
                                                                   "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=dt.timezone.utc)))
    expires = dt.datetime.strptime(cr["body"]["expirationDatetime"], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=dt.timezone.utc)
    assert abs((expires - created) - dt.timedelta(days=7)) < dt.timedelta(seconds=2)   # the default
    # Make it past due, as if seven days went by.
    await skm.rt.access_seal.update(skm.rt.storage, "change_requests", "id = ?", (rid,),
                                    {"expires_at": timeutil.to_db(timeutil.now() - dt.timedelta(seconds=1))})
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver)
    assert st == 409
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["status"] == "EXPIRED"
    # The expiry is configurable.
    skm.rt.changes.approvals.settings = dataclasses.replace(skm.rt.changes.approvals.settings, expiry_days=0.5)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "short"})
    st, cr = await skm.mgmt("GET", f"/approvals/{out['body']['changeRequestId']}")
    exp = dt.datetime.strptime(cr["body"]["expirationDatetime"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    assert dt.timedelta(hours=11) < exp - timeutil.now() <= dt.timedelta(hours=12)


async def test_concurrent_approvals_apply_once(skm):
    tokens = [await _operator(skm, f"appr{i}", "approver") for i in range(4)]
    store = await _approval_store(skm, needed=2)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "once"})
    rid = out["body"]["changeRequestId"]
    results = await asyncio.gather(*[skm.mgmt("POST", f"/approvals/{rid}/approve", token=t) for t in tokens])
    statuses = sorted(st for st, _ in results)
    # Two approvals apply it; the other two find it decided.
    assert statuses.count(200) == 2 and statuses.count(409) == 2, results
    st, keys = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys")
    assert [k["name"] for k in keys["body"]["keyList"]] == ["once"]
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["status"] == "APPLIED" and len(cr["body"]["approvals"]) == 2
    # A rotation needing two approvals: one approval leaves it pending and the key unrotated.
    key_id = cr["body"]["result"]["keyId"]
    st, out = await skm.mgmt("POST", f"/keys/{key_id}/rotate")
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=tokens[0])
    assert out["body"]["status"] == "PENDING"
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=tokens[0])
    assert st == 409 and "already approved" in out["header"]["resultDetail"]
    assert (await skm.rt.keys.key(key_id)).current_version == 0
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=tokens[1])
    assert out["body"]["status"] == "APPLIED"
    assert (await skm.rt.keys.key(key_id)).current_version == 1


async def test_no_eligible_approver_refuses_changes(skm):
    store = await _approval_store(skm)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "x"})
    assert st == 409 and out["header"]["resultMessage"] == "Approval Unavailable", out
    assert out["header"]["resultCode"] == ApprovalUnavailable.result_code != Conflict.result_code
    assert "approver" in out["header"]["resultDetail"]
    # A disabled approver does not count; two needed but one present does not pass either.
    await _operator(skm, "frank", "approver")
    st, _ = await skm.mgmt("PATCH", "/operators/frank", json={"disabled": True})
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", json={"keyType": "SYMMETRIC_KEY",
                                                                                     "name": "x"})
    assert st == 409
    st, _ = await skm.mgmt("PATCH", "/operators/frank", json={"disabled": False})
    rows = await skm.rt.storage.fetchall("SELECT id FROM change_requests")
    assert rows == []


async def test_turning_approval_off_needs_approval_and_a_failed_apply_is_recorded(skm):
    approver = await _operator(skm, "gina", "approver")
    store = await _approval_store(skm)
    sid = store["keyStoreId"]
    st, out = await skm.mgmt("PATCH", f"/keystores/{sid}", json={"approvalRequired": False})
    assert st == 202
    off = out["body"]["changeRequestId"]
    st, cr = await skm.mgmt("GET", f"/approvals/{off}")
    assert {"field": "approval_required", "from": True, "to": False} in cr["body"]["diff"]["changes"]
    assert (await skm.rt.keys.keystore(sid)).approval_required is True
    # Two requests for the same key name: the second fails when applied, with the reason.
    ids = []
    for _ in range(2):
        st, out = await skm.mgmt("POST", f"/keystores/{sid}/keys", json={"keyType": "SYMMETRIC_KEY", "name": "dup"})
        ids.append(out["body"]["changeRequestId"])
    st, out = await skm.mgmt("POST", f"/approvals/{ids[0]}/approve", token=approver)
    assert out["body"]["status"] == "APPLIED"
    st, out = await skm.mgmt("POST", f"/approvals/{ids[1]}/approve", token=approver)
    assert st == 200 and out["body"]["status"] == "FAILED" and "already exists" in out["body"]["reason"]
    st, out = await skm.mgmt("POST", f"/approvals/{off}/approve", token=approver)
    assert out["body"]["status"] == "APPLIED"
    assert (await skm.rt.keys.keystore(sid)).approval_required is False
    # The client data plane never waited: reads go on whatever the approval state.


async def test_approvers_are_notified_by_webhook_without_secrets(skm):
    received: list[dict] = []
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=503)      # the first delivery fails: it is retried
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve(app)
    try:
        svc = skm.rt.changes.approvals
        svc.settings = dataclasses.replace(svc.settings, webhook_url=f"http://127.0.0.1:{port}/hook")
        await _operator(skm, "hank", "approver")
        store = await _approval_store(skm)
        st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                                 json={"keyType": "SECRET", "name": "s", "secretValue": "webhook-must-not-see"})
        rid = out["body"]["changeRequestId"]
        for _ in range(50):
            if received:
                break
            await asyncio.sleep(0.1)
        assert calls["n"] == 2 and received[0]["changeRequestId"] == rid
        assert received[0]["event"] == "approval_requested" and received[0]["requestedBy"] == "admin"
        assert "webhook-must-not-see" not in json.dumps(received)
    finally:
        await runner.cleanup()


async def test_approval_unavailable_when_the_workflow_is_missing(skm):
    store = await _approval_store(skm)
    gate = skm.rt.changes
    saved, gate.approvals = gate.approvals, None
    try:
        st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                                 json={"keyType": "SYMMETRIC_KEY", "name": "x"})
    finally:
        gate.approvals = saved
    assert st == 409 and out["header"]["resultMessage"] == "Approval Unavailable", out
    assert out["header"]["resultCode"] == ApprovalUnavailable.result_code
    assert await skm.rt.storage.fetchall("SELECT id FROM change_requests") == []


async def test_client_event_streams_do_not_carry_approval_requests(skm):
    """approval_requested is for approvers (management plane), not for sidecars."""
    from tests.sidecar.test_event_stream import next_event
    await _operator(skm, "alice", "approver")
    store = await _approval_store(skm)
    cert, k = skm.client_cert("sidecar-approvals")
    s = skm.session(cert, k)
    async with s.get(skm.client_path("/events")) as resp:
        assert resp.status == 200
        assert (await next_event(resp))[0] == "hello"
        st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                                 json={"keyType": "SYMMETRIC_KEY", "name": "held"})
        assert st == 202, out
        await skm.rt.events.publish(Event(store["keyStoreId"], "something_new"))      # unknown kinds too
        await skm.rt.events.publish(Event(store["keyStoreId"], "auth_changed"))
        kind, data, _ = await next_event(resp)
        assert kind == "auth_changed", (kind, data)     # the first event through: the others were dropped
