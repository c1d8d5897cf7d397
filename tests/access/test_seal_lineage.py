"""Whoever can write the database cannot take an operator out of the requester's lineage
(server/access/lineage.py): every edge into an operator is kept in its own sealed row too, so deleting a
custody or grant row leaves the edge, and an operator in the lineage whose row was edited makes the
lineage unknown, so no approval through it counts. Each test plays that attacker with plain SQL on the
server's own database, then approves through the management API."""
from __future__ import annotations

from server.access.lineage import sealed_edges, seal_lineage
from server.access.seal import columns
from tests.access.test_seal_stores import _failures
from tests.access.test_sod import _api_operator, _fast, _guarded_store, _independent, _no_keys


async def _request_key(skm, store: dict, name: str) -> int:
    """A change request of the bootstrap admin's (the requester in every test here)."""
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SYMMETRIC_KEY", "name": name})
    assert st == 202, out
    return out["body"]["changeRequestId"]


async def _approve(skm, rid: int, token: str) -> tuple[int, dict]:
    return await skm.mgmt("POST", f"/approvals/{rid}/approve", token=token)


async def test_a_deleted_custody_row_does_not_free_the_approver(skm):
    """The admin holds a token it issued for an independent approver; deleting the custody row that
    records it must not make that approver's approval of the admin's request count."""
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "pat", "approver")
    await _independent(skm, "real", "approver")
    st, out = await skm.mgmt("POST", "/tokens", json={"operator": "pat"})
    assert st == 201, out
    pats_token_held_by_admin = out["body"]["token"]
    rid = await _request_key(skm, store, "aes")
    await skm.rt.storage.execute("DELETE FROM operator_custody")
    st, out = await _approve(skm, rid, pats_token_held_by_admin)
    assert st == 403 and "handed a credential by the requester" in out["header"]["resultDetail"], out
    await _no_keys(skm, store)
    # An approver the admin never touched still decides it.
    real = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("real"), "t")
    st, out = await _approve(skm, rid, real)
    assert st == 200 and out["body"]["status"] == "APPLIED", out


async def test_a_deleted_grant_row_does_not_free_the_approver(skm):
    """The admin granted an independent viewer the approver role; another admin later gave it the approver
    role in the project. Deleting the admin's grant row must not take the admin out of its lineage."""
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    vic = await _independent(skm, "vic", "viewer")
    boss = await _independent(skm, "boss", "admin")
    st, out = await skm.mgmt("POST", "/operators/vic/roles", json={"role": "approver"})
    assert st == 200, out
    st, out = await skm.mgmt("POST", "/operators/vic/roles", token=boss, json={"role": "approver", "projectId": 1})
    assert st == 200, out
    rid = await _request_key(skm, store, "aes")
    db = skm.rt.storage
    admin_id = await db.fetchval("SELECT id FROM operators WHERE name = 'admin'")
    vic_id = await db.fetchval("SELECT id FROM operators WHERE name = 'vic'")
    deleted = await db.execute("DELETE FROM operator_roles WHERE operator_id = ? AND granted_by_id = ?", vic_id,
                               admin_id)
    assert deleted == 1
    st, out = await _approve(skm, rid, vic)
    assert st == 403 and "by the requester" in out["header"]["resultDetail"], out
    await _no_keys(skm, store)


async def test_an_edited_operator_in_the_lineage_makes_every_approval_through_it_unknown(skm):
    """The admin made a sub-admin, which made an approver. Clearing the sub-admin's creator and granter in
    the database would cut the admin out of the approver's lineage; the sub-admin's row then fails its
    seal, and the approval does not count, with a message that says why."""
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    sub = await _api_operator(skm, "sub-admin", "admin")
    grandchild = await _api_operator(skm, "grandchild", "approver", token=sub)
    rid = await _request_key(skm, store, "aes")
    db = skm.rt.storage
    sub_id = await db.fetchval("SELECT id FROM operators WHERE name = 'sub-admin'")
    await db.execute("UPDATE operators SET created_by_id = NULL WHERE id = ?", sub_id)
    await db.execute("UPDATE operator_roles SET granted_by_id = NULL WHERE operator_id = ?", sub_id)
    st, out = await _approve(skm, rid, grandchild)
    assert st == 403, out
    assert out["header"]["resultDetail"].startswith(f"operator {sub_id} in the lineage"), out
    assert "restored from a backup" in out["header"]["resultDetail"]
    assert await _failures(skm, "operators") >= 1
    await _no_keys(skm, store)


async def test_edges_already_in_the_tables_are_sealed_into_their_operators_at_start(skm):
    """What the first start after migration 13 does: an operator row sealed before the column existed
    (lineage NULL) keeps its seal, and gets the edges the grant and custody tables hold, sealed."""
    _fast(skm)
    db, seal = skm.rt.storage, skm.rt.access_seal
    await _independent(skm, "pat", "approver")
    await _independent(skm, "lone", "approver")
    st, out = await skm.mgmt("POST", "/tokens", json={"operator": "pat"})
    assert st == 201, out
    admin_id = await db.fetchval("SELECT id FROM operators WHERE name = 'admin'")

    async def row(name: str) -> dict:
        return await db.fetchone(f"SELECT {columns('operators')} FROM operators WHERE name = ?", name)

    assert sealed_edges(await row("pat")).keys() == {admin_id}
    assert (await row("lone"))["lineage"] is None
    # Every row as the code before migration 13 sealed it: no lineage, the seal without it.
    for name in ("admin", "pat", "lone"):
        r = await row(name)
        await db.execute("UPDATE operators SET lineage = NULL, seal = ? WHERE id = ?",
                         await seal.mac("operators", {**r, "lineage": None}), r["id"])
        assert await seal.valid("operators", await row(name))
    lone_seal = (await row("lone"))["seal"]
    assert await seal_lineage(db, seal) == 1
    pat = await row("pat")
    assert sealed_edges(pat).keys() == {admin_id} and await seal.valid("operators", pat)
    assert (await row("lone"))["seal"] == lone_seal          # no edges: untouched
    assert await seal_lineage(db, seal) == 0                 # nothing left to copy
    # Emptying the column again, as an attacker would to drop the edge, breaks the row's seal.
    await db.execute("UPDATE operators SET lineage = NULL WHERE name = 'pat'")
    assert not await seal.valid("operators", await row("pat"))
    # And a row that fails its seal is never sealed afresh by the copy.
    await db.execute("INSERT INTO operator_custody (operator_id, by_id, what, at) VALUES (?, ?, 'token', ?)",
                     pat["id"], admin_id, "2999-01-01 00:00:00.000000")
    assert await seal_lineage(db, seal) == 0
    assert not await seal.valid("operators", await row("pat"))
