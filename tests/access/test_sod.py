"""Separation of duties through the management and client APIs of a real server.

The attacks of issue 14, each refused with a clear message and nothing applied:
* a lone admin creates an approver (a puppet), logs in as it and approves its own request;
* the same through a puppet admin (lineage followed transitively), or with a role granted after
  the request was made;
* one person acting through several credentials (operator token, user access key, bearer token)
  approving their own request;
* the reverse puppet: an admin who is also an approver makes a puppet admin, requests as the
  puppet and approves as itself (the approver is the requester's ancestor); and an operator behind
  the requester who takes hold of an approver while the request waits;
and operator management under approval (`[approvals] operators = true`).
"""
from __future__ import annotations

import dataclasses

import pytest

from server.config import load
from server.settings import ServerConfig
from tests.access.helpers import access_key, bearer, v12_headers

PW = "a long enough password"


async def _login(skm, name: str, password: str = PW) -> str:
    async with skm._default().post(f"{skm.mgmt_url}/api/v1/login", json={"name": name, "password": password}) as r:
        out = await r.json()
        assert r.status == 200, out
        return out["body"]["token"]


async def _api_operator(skm, name: str, role: str, token: str | None = None, **fields) -> str:
    """Created through the API by `token`'s operator (default: the bootstrap admin); logged in."""
    st, out = await skm.mgmt("POST", "/operators", token=token, json={"name": name, "role": role, "password": PW,
                                                                      **fields})
    assert st == 201, out
    return await _login(skm, name)


async def _independent(skm, name: str, role: str) -> str:
    """An operator with no lineage (as `skm server init` makes one)."""
    return await skm.rt.operators.issue_token(await skm.rt.operators.create(name, role), "test")


async def _guarded_store(skm, name: str = "guarded") -> dict:
    store = await skm.keystore(name)
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}", json={"approvalRequired": True})
    assert st == 200, out
    return out["body"]


def _fast(skm) -> None:
    skm.rt.operators.configure(dataclasses.replace(skm.rt.operators.settings, argon2_memory_kib=8192,
                                                   argon2_time_cost=1))


async def _no_keys(skm, store: dict) -> None:
    st, out = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys")
    assert st == 200 and out["body"]["keyList"] == [], out


async def test_a_lone_admin_cannot_approve_through_a_puppet_approver(skm):
    _fast(skm)
    store = await _guarded_store(skm)
    # Nobody else exists: the admin's puppet does not make approval possible (fail closed, nothing held).
    puppet = await _api_operator(skm, "sock", "approver")
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "pw", "secretValue": "lone-admin-value"})
    assert st == 409 and out["header"]["resultMessage"] == "Approval Unavailable", out
    assert "operators you created" in out["header"]["resultDetail"]
    assert await skm.rt.storage.fetchall("SELECT id FROM change_requests") == []
    # With one independent approver the request can be made; the puppet's approval still does not count.
    await _independent(skm, "real", "approver")
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "pw", "secretValue": "lone-admin-value"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=puppet)
    assert st == 403 and "created" in out["header"]["resultDetail"], out
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["status"] == "PENDING" and cr["body"]["approvals"] == []
    await _no_keys(skm, store)


async def test_transitive_puppets_and_late_grants_do_not_count(skm):
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    # A puppet admin makes an approver: that approver descends from the admin too.
    puppet_admin = await _api_operator(skm, "sub-admin", "admin")
    grandchild = await _api_operator(skm, "grandchild", "approver", token=puppet_admin)
    # An independent viewer the requester promotes to approver: granted by the requester.
    viewer = await _independent(skm, "vic", "viewer")
    st, out = await skm.mgmt("POST", "/operators/vic/roles", json={"role": "approver"})
    assert st == 200, out
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SYMMETRIC_KEY", "name": "aes"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    for token in (grandchild, viewer):
        st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=token)
        assert st == 403 and "created, given a role or handed a credential by the requester" in \
            out["header"]["resultDetail"], out
    # An approver made after the request by someone independent: its role is too recent.
    late = await _independent(skm, "late", "approver")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=late)
    assert st == 403 and "granted after this change request" in out["header"]["resultDetail"], out
    # Handing a credential to an independent approver makes it the issuer's too.
    real_token_for_admin = await skm.mgmt("POST", "/tokens", json={"operator": "real"})
    assert real_token_for_admin[0] == 201
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=real_token_for_admin[1]["body"]["token"])
    assert st == 403 and "credential" in out["header"]["resultDetail"], out
    await _no_keys(skm, store)
    # The history of every grant is kept.
    st, hist = await skm.mgmt("GET", "/operators/vic/roles")
    assert [(g["role"], g["grantedBy"], g["revokedBy"]) for g in hist["body"]["grants"]] == \
        [("viewer", None, "admin"), ("approver", "admin", None)]
    st, desc = await skm.mgmt("GET", "/operators/grandchild")
    assert desc["body"]["createdBy"] == "sub-admin" and desc["body"]["roles"][0]["grantedBy"] == "sub-admin"


async def test_the_reverse_puppet_is_refused(skm):
    """X is a global admin and (granted by someone else) approver of the project. X makes a puppet admin,
    requests as the puppet and approves as itself: X is the puppet's ancestor, so it does not count."""
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    boss = await _independent(skm, "boss", "admin")
    x = await _independent(skm, "x", "admin")
    st, out = await skm.mgmt("POST", "/operators/x/roles", token=boss, json={"role": "approver", "projectId": 1})
    assert st == 200, out
    puppet = await _api_operator(skm, "puppet", "admin", token=x)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", token=puppet,
                             json={"keyType": "SYMMETRIC_KEY", "name": "by-puppet"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=x)
    assert st == 403 and out["header"]["resultDetail"].startswith("you created the requester"), out
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["status"] == "PENDING" and cr["body"]["approvals"] == [], cr
    await _no_keys(skm, store)
    # Also through a second puppet level (X made a sub-admin who made the requester): still X's.
    sub = await _api_operator(skm, "sub", "admin", token=x)
    grandpuppet = await _api_operator(skm, "grandpuppet", "admin", token=sub)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", token=grandpuppet,
                             json={"keyType": "SYMMETRIC_KEY", "name": "by-grandpuppet"})
    assert st == 202, out
    st, out = await skm.mgmt("POST", f"/approvals/{out['body']['changeRequestId']}/approve", token=x)
    assert st == 403 and "you created the requester" in out["header"]["resultDetail"], out
    await _no_keys(skm, store)
    # An approver the requester's line never touched decides it: the request was never stuck.
    real = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("real"), "t")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=real)
    assert st == 200 and out["body"]["status"] == "APPLIED", out


async def test_an_approver_taken_over_while_the_request_waits_does_not_count(skm):
    """A common ancestor of requester and approver counts against the approval when its edge into the
    approver's line was made within the request's lifetime: here X, behind the requester, issues
    itself a token of the independent approver after the request was made."""
    _fast(skm)
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    await _independent(skm, "other", "approver")
    x = await _independent(skm, "x", "admin")
    puppet = await _api_operator(skm, "puppet", "admin", token=x)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", token=puppet,
                             json={"keyType": "SYMMETRIC_KEY", "name": "late-edge"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", "/tokens", token=x, json={"operator": "real"})
    assert st == 201, out
    taken = out["body"]["token"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=taken)
    assert st == 403 and out["header"]["resultDetail"].startswith("since this change request was made"), out
    await _no_keys(skm, store)
    # An approver nobody behind the requester touched still decides it.
    other = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("other"), "t")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=other)
    assert st == 200 and out["body"]["status"] == "APPLIED", out


async def test_an_independent_approver_applies_the_change(skm):
    store = await _guarded_store(skm)
    real = await _independent(skm, "real", "approver")
    # A second admin the bootstrap admin made: the independent approver decides its requests.
    second = await skm.rt.operators.issue_token(await skm.rt.operators.create(
        "second", "admin", by=await skm.rt.operators.by_name("admin")))
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys", token=second,
                             json={"keyType": "SYMMETRIC_KEY", "name": "ok"})
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=real)
    assert st == 200 and out["body"]["status"] == "APPLIED", out


async def test_one_identity_across_credentials(skm, tmp_path):
    """A person who is a global admin and an approver of the project: a request made with an access key
    or a bearer token is theirs (not `uak:...`), so they cannot approve it, and they can cancel it."""
    store = await _guarded_store(skm)
    await _independent(skm, "real", "approver")
    dual_op = await skm.rt.operators.create("dual", "admin")
    dual = await skm.rt.operators.issue_token(dual_op)
    st, out = await skm.mgmt("POST", "/operators/dual/roles", json={"role": "approver", "projectId": 1})
    assert st == 200, out
    kid, secret = await access_key(skm, description="dual's", operator="dual")
    tok = await bearer(skm, kid, secret)
    rids = []
    for version, headers in (("v1.2", v12_headers(kid, secret)), ("v1.3", {"X-NHN-Authorization": tok})):
        st, out = await skm.client("POST", "/keys/symmetric-keys/create", version=version, headers=headers,
                                   json={"keyStoreName": store["name"], "name": f"via-{version[-1]}"})
        assert st == 202, out
        rids.append(out["body"]["changeRequestId"])
    for rid, cred in zip(rids, ("accesskey:", "bearer:")):
        st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
        assert cr["body"]["requestedBy"] == "dual" and cr["body"]["credential"].startswith(cred), cr
        st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=dual)
        assert st == 403 and "own change request" in out["header"]["resultDetail"], out
        # Nobody else cancels it; its requester does, with the other credential.
        st, out = await skm.mgmt("POST", f"/approvals/{rid}/cancel")
        assert st == 403
        st, out = await skm.mgmt("POST", f"/approvals/{rid}/cancel", token=dual)
        assert st == 200 and out["body"]["status"] == "CANCELLED", out
    await _no_keys(skm, store)


async def test_operator_management_under_approval(skm):
    _fast(skm)
    # Bootstrap: with the setting off the first admin makes the team.
    a = await _api_operator(skm, "admin-a", "admin")
    b = await _api_operator(skm, "admin-b", "admin")
    svc = skm.rt.changes.approvals
    svc.settings = dataclasses.replace(svc.settings, operators=True)
    # Creating an operator is a change request; nothing exists yet; its password is sealed.
    st, out = await skm.mgmt("POST", "/operators", token=a, json={"name": "mallory", "role": "approver",
                                                                  "password": "mallory's own password"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    st, _ = await skm.mgmt("GET", "/operators/mallory")
    assert st == 404
    st, cr = await skm.mgmt("GET", f"/approvals/{rid}")
    assert cr["body"]["keyStoreId"] is None and "mallory's own password" not in str(cr)
    # The requester cannot approve; an approver (not a global admin) cannot either.
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=a)
    assert st == 403 and "own" in out["header"]["resultDetail"]
    approver = await _independent(skm, "appr", "approver")
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=approver)
    assert st == 403 and "admin" in out["header"]["resultDetail"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=b)
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    st, desc = await skm.mgmt("GET", "/operators/mallory")
    assert desc["body"]["createdBy"] == "admin-a" and desc["body"]["hasPassword"] is True
    # Granting a role, resetting another's password, a token for someone else: each waits.
    for method, path, body in (("POST", "/operators/mallory/roles", {"role": "admin"}),
                               ("PATCH", "/operators/mallory", {"role": "viewer"}),
                               ("PATCH", "/operators/mallory", {"password": "admin-a chose this"}),
                               ("POST", "/tokens", {"operator": "mallory"}),
                               ("POST", "/access-keys", {"operator": "mallory"})):
        st, out = await skm.mgmt(method, path, token=a, json=body)
        assert st == 202, (path, out)
    st, desc = await skm.mgmt("GET", "/operators/mallory")
    assert [g["role"] for g in desc["body"]["roles"]] == ["approver"]
    assert await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM operator_tokens o JOIN operators p ON "
                                         "p.id = o.operator_id WHERE p.name = 'mallory'") == 0
    # The token request, approved by another admin: its requester collects the token once.
    st, out = await skm.mgmt("GET", "/approvals?status=PENDING")
    by_op = {c["operation"]: c["changeRequestId"] for c in out["body"]["changeRequests"]}
    rid = by_op["operator.token"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=b)
    assert out["body"]["status"] == "APPLIED" and "skm_" not in str(out), out
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/collect", token=b)
    assert st == 403
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/collect", token=a)
    assert st == 200 and out["body"]["token"].startswith("skm_")
    st, me = await skm.mgmt("GET", "/whoami", token=out["body"]["token"])
    assert me["body"]["name"] == "mallory"
    st, again = await skm.mgmt("POST", f"/approvals/{rid}/collect", token=a)
    assert st == 409
    # Nobody decides a change to their own account, nor grants themselves a role.
    st, out = await skm.mgmt("POST", "/operators/admin-b/roles", token=a, json={"role": "approver", "projectId": 1})
    assert st == 202, out
    st, out = await skm.mgmt("POST", f"/approvals/{out['body']['changeRequestId']}/approve", token=b)
    assert st == 403 and "your own account" in out["header"]["resultDetail"], out
    st, out = await skm.mgmt("POST", "/operators/admin-a/roles", token=a, json={"role": "approver", "projectId": 1})
    assert st == 409 and "your own roles" in out["header"]["resultDetail"], out
    # Revoking and disabling still take effect at once.
    st, out = await skm.mgmt("PATCH", "/operators/mallory", token=a, json={"disabled": True})
    assert st == 200 and out["body"]["disabled"] is True


def test_the_operators_setting_is_a_config_value(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text("[approvals]\noperators = true\n[login]\nmax_failures_per_name = 40\n")
    cfg = load(ServerConfig, toml, env={})
    assert cfg.approvals.operators is True and cfg.login.max_failures_per_name == 40
    assert load(ServerConfig, None, env={"SKM_APPROVALS_OPERATORS": "1"}).approvals.operators is True
    with pytest.raises(Exception, match="operatorz"):
        toml.write_text("[approvals]\noperatorz = true\n")
        load(ServerConfig, toml, env={})
