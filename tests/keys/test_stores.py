"""Key store deletion (server/keys/stores.py): only an empty store goes, with its client checks; with approval
on it waits for an approver and is applied by the approval."""
from __future__ import annotations

import pytest

from server.errors import ApprovalRequired, Conflict, KeyStoreNotFound
from server.keys.stores import delete_keystore


async def test_refused_while_it_holds_a_key_then_deleted_with_its_checks(skm):
    store = await skm.keystore("doomed")           # has an IPv4 entry
    key = await skm.key(store, "SECRET", "k", secretValue="v")
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/certificates",
                             json={"name": "c1", "password": "bundle-password-1"})
    assert st == 201, out
    ks = await skm.rt.keys.keystore(store["keyStoreId"])
    with pytest.raises(Conflict, match="still holds 1 key"):
        await delete_keystore(skm.rt.changes, ks, actor="admin")
    assert await skm.rt.keys.keystore(ks.id)        # nothing changed
    k = await skm.rt.keys.schedule_deletion(await skm.rt.keys.key(key["keyId"]), actor="admin")
    with pytest.raises(Conflict):               # scheduled for deletion still counts
        await delete_keystore(skm.rt.changes, ks, actor="admin")
    await skm.rt.keys.delete_now(k, actor="admin")
    out = await delete_keystore(skm.rt.changes, ks, actor="admin")
    assert out["deleted"] is True
    with pytest.raises(KeyStoreNotFound):
        await skm.rt.keys.keystore(ks.id)
    for table in ("auth_ipv4s", "auth_certificates"):
        assert await skm.rt.storage.fetchval(f"SELECT COUNT(*) FROM {table} WHERE keystore_id = ?", ks.id) == 0


async def test_with_approval_on_the_deletion_is_a_change_request(skm):
    import server.console.keystores  # noqa: F401  (registers the keystore.delete change)
    # An approver with no lineage (as `skm server init` makes one): independent of the requesting admin.
    approver = await skm.rt.operators.issue_token(await skm.rt.operators.create("alice", "approver"), "t")
    store = await skm.keystore("guarded")
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}",
                             json={"approvalRequired": True, "approvalsNeeded": 1})
    assert st == 200, out
    ks = await skm.rt.keys.keystore(store["keyStoreId"])
    with pytest.raises(ApprovalRequired) as e:
        await skm.rt.changes.submit(await skm.rt.operators.by_name("admin"), ks, "keystore.delete",
                                    {"keystore_id": ks.id})
    assert await skm.rt.keys.keystore(ks.id)        # still there until approved
    st, out = await skm.mgmt("POST", f"/approvals/{e.value.request_id}/approve", token=approver)
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    assert [a["operator"] for a in out["body"]["approvals"]] == ["alice"]
    with pytest.raises(KeyStoreNotFound):
        await skm.rt.keys.keystore(ks.id)
