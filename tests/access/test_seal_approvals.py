"""Whoever can write the database, without the system key, cannot get a change past the approvers
(server/access/seal.py): not by editing what a pending request applies behind the diff approvers read,
lowering how many must agree, adding approvals, or reviving a denied request. Each test plays that
attacker with plain SQL on the server's own database, then acts through the management API."""
from __future__ import annotations

import json

from tests.access.test_approvals import _approval_store, _operator
from tests.access.test_seal_stores import NOW, _failures, _refused_as_edited


async def _entries(skm, ks_id: int) -> list[str]:
    st, out = await skm.mgmt("GET", f"/keystores/{ks_id}/auths/ipv4s")
    assert st == 200, out
    return sorted(e["value"] for e in out["body"]["entries"])


async def _request_address(skm, ks_id: int, value: str) -> int:
    st, out = await skm.mgmt("POST", f"/keystores/{ks_id}/auths/ipv4s", json={"value": value})
    assert st == 202, out
    return out["body"]["changeRequestId"]


async def test_a_request_edited_behind_its_diff_is_never_approved_and_can_be_denied(skm):
    db = skm.rt.storage
    alice = await _operator(skm, "alice", "approver")
    store = await _approval_store(skm)
    sid = store["keyStoreId"]
    rid = await _request_address(skm, sid, "10.1.2.3")
    # What the approver reads stays 10.1.2.3; what would be applied becomes the whole internet.
    params = json.loads(await db.fetchval("SELECT params FROM change_requests WHERE id = ?", rid))
    await db.execute("UPDATE change_requests SET params = ? WHERE id = ?", json.dumps({**params, "value": "0.0.0.0/0"}),
                     rid)
    st, out = await skm.mgmt("GET", f"/approvals/{rid}", token=alice)
    assert st == 200 and out["body"]["status"] == "INVALID", out
    _refused_as_edited(*await skm.mgmt("POST", f"/approvals/{rid}/approve", token=alice))
    assert await _entries(skm, sid) == ["127.0.0.1"]
    assert await _failures(skm, "change_requests") >= 1
    # Denying it ends it; nothing was applied.
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/deny", token=alice, json={"comment": "edited"})
    assert st == 200, out
    assert await db.fetchval("SELECT status FROM change_requests WHERE id = ?", rid) == "DENIED"
    # A request made afterwards goes through as usual.
    rid2 = await _request_address(skm, sid, "10.1.2.3")
    st, out = await skm.mgmt("POST", f"/approvals/{rid2}/approve", token=alice)
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    assert await _entries(skm, sid) == ["10.1.2.3", "127.0.0.1"]


async def test_approvals_needed_lowered_or_approvals_added_in_the_database_do_not_count(skm):
    db = skm.rt.storage
    alice = await _operator(skm, "alice", "approver")
    bob = await _operator(skm, "bob", "approver")
    store = await _approval_store(skm, needed=2)
    sid = store["keyStoreId"]
    # Lowered to one: alice's approval alone must not apply it.
    rid = await _request_address(skm, sid, "10.0.0.1")
    await db.execute("UPDATE change_requests SET approvals_needed = 1 WHERE id = ?", rid)
    _refused_as_edited(*await skm.mgmt("POST", f"/approvals/{rid}/approve", token=alice))
    assert await _entries(skm, sid) == ["127.0.0.1"]
    # Bob's approval written into the database, with the seal of a real approval copied onto it: alice's
    # approval is the only one that counts, so the request keeps waiting.
    rid = await _request_address(skm, sid, "10.0.0.2")
    bob_id = await db.fetchval("SELECT id FROM operators WHERE name = 'bob'")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=alice)
    assert st == 200 and out["body"]["status"] == "PENDING", out
    real = await db.fetchval("SELECT seal FROM change_approvals WHERE request_id = ?", rid)
    await db.execute("INSERT INTO change_approvals (request_id, operator, operator_id, comment, created_at, seal) "
                     "VALUES (?, 'bob', ?, 'forged', ?, ?)", rid, bob_id, NOW, real)
    st, out = await skm.mgmt("GET", f"/approvals/{rid}")
    assert [a["operator"] for a in out["body"]["approvals"]] == ["alice"], out
    assert await _failures(skm, "change_approvals") >= 1
    # Another approver's click is still needed; the row forged in bob's name does not stand in the way of
    # his real approval (it replaces it).
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=bob)
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    assert [a["operator"] for a in out["body"]["approvals"]] == ["alice", "bob"], out
    assert await _entries(skm, sid) == ["10.0.0.2", "127.0.0.1"]


async def test_a_denied_request_revived_in_the_database_stays_denied(skm):
    db = skm.rt.storage
    alice = await _operator(skm, "alice", "approver")
    bob = await _operator(skm, "bob", "approver")
    store = await _approval_store(skm)
    sid = store["keyStoreId"]
    rid = await _request_address(skm, sid, "0.0.0.0/0")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/deny", token=alice, json={"comment": "no"})
    assert st == 200 and out["body"]["status"] == "DENIED", out
    await db.execute("UPDATE change_requests SET status = 'PENDING', decided_by = NULL WHERE id = ?", rid)
    _refused_as_edited(*await skm.mgmt("POST", f"/approvals/{rid}/approve", token=bob))
    assert await _entries(skm, sid) == ["127.0.0.1"]
