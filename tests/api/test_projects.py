"""Several teams, one server: projects and project-scoped operators through the management and
client APIs. An operator of project A sees and changes nothing of project B (404: B's things do
not exist for it), while a global admin sees both."""
from __future__ import annotations

import json

import pytest

from tests.access.helpers import access_key, v12_headers


async def _token(skm, name: str) -> str:
    return await skm.rt.operators.issue_token(await skm.rt.operators.by_name(name), "test")


@pytest.fixture
async def two(skm):
    """Project A (the first one) and project B, a guarded store with a key and a pending request in each,
    and operators scoped to A, made through the API by the global admin."""
    st, out = await skm.mgmt("POST", "/projects", json={"name": "team-b", "description": "the other team"})
    assert st == 201, out
    b = out["body"]
    assert b["appkey"] and b["name"] == "team-b" and b["createdAt"] and b["id"] == 2
    st, projects = await skm.mgmt("GET", "/projects")
    a = projects["body"]["projects"][0]
    ids = {}
    for proj, name in ((a, "store-a"), (b, "store-b")):
        st, out = await skm.mgmt("POST", "/keystores", json={"name": name, "ip4AuthUse": "Y", "appkey": proj["appkey"]})
        assert st == 201, out
        sid = out["body"]["keyStoreId"]
        key = await skm.key(out["body"], "SECRET", "pw", secretValue=f"value-of-{name}")
        st, _ = await skm.mgmt("POST", f"/keystores/{sid}/auths/ipv4s", json={"value": "127.0.0.1"})
        await skm.rt.operators.create(f"appr-{name}", "approver", project_id=proj["id"])   # independent approvers
        st, _ = await skm.mgmt("PATCH", f"/keystores/{sid}", json={"approvalRequired": True})
        st, out = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "next"})
        assert st == 202, out
        ids[name] = {"sid": sid, "kid": key["keyId"], "rid": out["body"]["changeRequestId"], "project": proj}
    tokens = {}
    for role in ("admin", "approver", "viewer"):
        st, out = await skm.mgmt("POST", "/operators", json={"name": f"a-{role}", "role": role,
                                                             "projectId": a["id"]})
        assert st == 201 and out["body"]["roles"] == [{**out["body"]["roles"][0], "role": role, "projectId": 1}]
        tokens[role] = await _token(skm, f"a-{role}")
    return {"a": a, "b": b, "ids": ids, "tokens": tokens}


async def _snapshot(skm) -> str:
    rows = {}
    for table in ("keystores", "keys", "key_versions", "auth_ipv4s", "auth_certificates", "change_requests",
                  "change_approvals", "user_access_keys", "operators", "operator_roles", "projects"):
        rows[table] = await skm.rt.storage.fetchall(f"SELECT * FROM {table}")
    for r in rows["key_versions"]:
        r["material_sealed"] = bytes(r["material_sealed"]).hex()
        r["public_der"] = None
    for r in rows["change_requests"]:
        r["secrets_sealed"] = r["secrets_sealed"] is not None
        r.pop("updated_at")
    for r in rows["auth_certificates"]:
        r["password_sealed"] = r["bundle_sealed"] = None
    return json.dumps(rows, sort_keys=True, default=str)


async def test_a_project_operator_sees_and_changes_nothing_of_another_project(skm, two):
    b, ids = two["b"], two["ids"]
    sb, kb, rb = ids["store-b"]["sid"], ids["store-b"]["kid"], ids["store-b"]["rid"]
    sa = ids["store-a"]["sid"]
    await access_key(skm, description="the global admin's")
    before = await _snapshot(skm)
    for role, token in two["tokens"].items():
        # Listings hold A only.
        st, out = await skm.mgmt("GET", "/keystores", token=token)
        assert [s["name"] for s in out["body"]["keyStoreList"]] == ["store-a"], (role, out)
        st, out = await skm.mgmt("GET", "/projects", token=token)
        assert [p["id"] for p in out["body"]["projects"]] == [1], (role, out)
        st, out = await skm.mgmt("GET", "/approvals", token=token)
        assert [c["changeRequestId"] for c in out["body"]["changeRequests"]] == [ids["store-a"]["rid"]], role
        st, out = await skm.mgmt("GET", "/access-keys", token=token)
        assert out["body"]["accessKeys"] == [], (role, out)          # the global admin's key is not theirs
        st, out = await skm.mgmt("GET", "/operators", token=token)
        names = {o["name"] for o in out["body"]["operators"]}
        assert "appr-store-b" not in names and "admin" not in names and "a-viewer" in names, (role, names)
        assert all(g["projectId"] == 1 for o in out["body"]["operators"] for g in o["roles"]), role
        # Reads of B: 404, as if nothing were there.
        for path in (f"/keystores/{sb}", f"/keystores/{sb}/keys", f"/keys/{kb}", f"/keystores/{sb}/auths/ipv4s",
                     f"/keystores/{sb}/certificates", f"/approvals/{rb}", f"/projects/{b['id']}",
                     "/operators/appr-store-b"):
            st, out = await skm.mgmt("GET", path, token=token)
            assert st == 404, (role, path, out)
        # Changes to B: 404 too (never 403, which would say it exists), and nothing changes.
        for method, path, body in (
                ("PATCH", f"/keystores/{sb}", {"description": "mine now"}),
                ("POST", f"/keystores/{sb}/keys", {"keyType": "SYMMETRIC_KEY", "name": "k"}),
                ("POST", f"/keys/{kb}/rotate", {"secretValue": "x"}),
                ("POST", f"/keys/{kb}/schedule-deletion", None),
                ("POST", f"/keys/{kb}/reveal", None),
                ("PATCH", f"/keys/{kb}", {"description": "x"}),
                ("POST", f"/keys/{kb}/cancel-deletion", None),
                ("DELETE", f"/keys/{kb}", None),
                ("POST", f"/keystores/{sb}/auths/ipv4s", {"value": "10.9.9.9"}),
                ("POST", f"/keystores/{sb}/auths/ipv4s/schedule-deletion", {"value": "127.0.0.1"}),
                ("POST", f"/keystores/{sb}/auths/ipv4s/delete", {"value": "127.0.0.1"}),
                ("POST", f"/keystores/{sb}/certificates", {"name": "c", "password": "long enough pw"}),
                ("POST", f"/keystores/{sb}/certificates/schedule-deletion", {"name": "c"}),
                ("GET", f"/keystores/{sb}/certificates/c/bundle", None),
                ("POST", f"/approvals/{rb}/approve", None), ("POST", f"/approvals/{rb}/deny", None),
                ("POST", f"/approvals/{rb}/cancel", None)):
            st, out = await skm.mgmt(method, path, json=body, token=token)
            assert st == 404, (role, method, path, out)
            assert "value-of-store-b" not in str(out)
        # B's appkey does not exist for them either.
        st, out = await skm.mgmt("POST", "/keystores", token=token,
                                 json={"name": "sneak", "ip4AuthUse": "Y", "appkey": b["appkey"]})
        assert st == 401 and out["header"]["resultMessage"] == "Invalid Appkey", (role, out)   # NHN's status
        st, out = await skm.mgmt("POST", "/access-keys", token=token, json={"appkey": b["appkey"]})
        assert st == 401 and out["header"]["resultMessage"] == "Invalid Appkey", (role, out)
        # Installation-wide management is for global admins.
        for method, path, body in (("POST", "/projects", {"name": "mine"}),
                                   ("POST", "/operators", {"name": "x", "role": "viewer", "projectId": 2}),
                                   ("POST", "/operators/a-viewer/roles", {"role": "admin", "projectId": 2}),
                                   ("GET", "/audit/verify", None)):
            st, out = await skm.mgmt(method, path, json=body, token=token)
            assert st == 403, (role, method, path, out)
    assert await _snapshot(skm) == before


async def test_roles_apply_inside_the_project(skm, two):
    ids, tokens = two["ids"], two["tokens"]
    sa, ka, ra = ids["store-a"]["sid"], ids["store-a"]["kid"], ids["store-a"]["rid"]
    # The viewer reads A and changes nothing; the approver decides A's requests, not changes.
    for path in (f"/keystores/{sa}", f"/keystores/{sa}/keys", f"/keys/{ka}", f"/approvals/{ra}"):
        st, out = await skm.mgmt("GET", path, token=tokens["viewer"])
        assert st == 200, (path, out)
    for role in ("viewer", "approver"):
        st, out = await skm.mgmt("POST", f"/keystores/{sa}/keys", token=tokens[role],
                                 json={"keyType": "SYMMETRIC_KEY", "name": "k"})
        assert st == 403, (role, out)
    st, out = await skm.mgmt("POST", f"/approvals/{ra}/approve", token=tokens["viewer"])
    assert st == 403
    # A's admin changes A: its request waits for A's approvers; A's approver applies it (created by the
    # global admin, not by A's admin).
    st, out = await skm.mgmt("POST", f"/keystores/{sa}/keys", token=tokens["admin"],
                             json={"keyType": "SYMMETRIC_KEY", "name": "a-key"})
    assert st == 202, out
    rid = out["body"]["changeRequestId"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=tokens["approver"])
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    # A new store lands in A without naming it (A's admin administers one project).
    st, out = await skm.mgmt("POST", "/keystores", token=tokens["admin"], json={"name": "a2", "ip4AuthUse": "Y"})
    assert st == 201, out
    assert (await skm.rt.keys.keystore(out["body"]["keyStoreId"])).project_id == 1
    # The global admin sees both projects.
    st, out = await skm.mgmt("GET", "/keystores")
    assert {s["name"] for s in out["body"]["keyStoreList"]} == {"store-a", "store-b", "a2"}
    st, out = await skm.mgmt("GET", "/approvals?status=PENDING")
    assert {c["projectId"] for c in out["body"]["changeRequests"]} == {1, 2}


async def test_a_project_operators_access_key_works_in_its_project_only(skm, two):
    a, b, tokens = two["a"], two["b"], two["tokens"]
    st, out = await skm.mgmt("POST", "/access-keys", token=tokens["admin"], json={})
    kid, secret = out["body"]["accessKeyId"], out["body"]["secretAccessKey"]
    h = v12_headers(kid, secret)

    async def call(appkey: str):
        url = skm.client_path("/keystores", "v1.2", appkey)
        async with skm._default().get(url, headers=h) as r:
            return r.status, await r.json(content_type=None)
    st, out = await call(a["appkey"])
    assert st == 200, out
    st, out = await call(b["appkey"])
    assert st == 403 and "no role in this project" in out["header"]["resultDetail"], out
    # A global operator's key works everywhere, as before.
    gk, gs = await access_key(skm)
    async with skm._default().get(skm.client_path("/keystores", "v1.2", b["appkey"]), headers=v12_headers(gk, gs)) \
            as r:
        assert r.status == 200


async def test_project_routes(skm):
    st, out = await skm.mgmt("POST", "/projects", json={"name": "dup"})
    assert st == 201
    st, out = await skm.mgmt("POST", "/projects", json={"name": "dup"})
    assert st == 409
    for bad in ({}, {"name": ""}, {"name": "x" * 101}, {"name": "ok", "extra": 1}, {"name": "../etc"}):
        st, out = await skm.mgmt("POST", "/projects", json=bad)
        assert st == 400, (bad, out)
    st, out = await skm.mgmt("GET", "/projects/999")
    assert st == 404
    st, out = await skm.mgmt("GET", "/projects/2")
    assert out["body"]["name"] == "dup"
    # Without `public_url`: the data listener's own address and port (what `skm demo` prints), and a client
    # reaches its client API there.
    dup = out["body"]
    assert dup["dataPlaneUrl"] == f"{skm.data_url}/keymanager/v1.0/appkey/{dup['appkey']}", dup
    st, out = await skm.mgmt("GET", "/projects")
    assert [p["dataPlaneUrl"] for p in out["body"]["projects"]] == \
        [f"{skm.data_url}/keymanager/v1.0/appkey/{p['appkey']}" for p in out["body"]["projects"]]
    st, ks = await skm.mgmt("POST", "/keystores", json={"name": "dup-store", "ip4AuthUse": "Y",
                                                         "appkey": dup["appkey"]})
    st, ks = await skm.mgmt("GET", f"/keystores/{ks['body']['keyStoreId']}")
    assert ks["body"]["dataPlaneUrl"] == dup["dataPlaneUrl"] and ks["body"]["appkey"] == dup["appkey"], ks
    async with skm._default().get(dup["dataPlaneUrl"] + "/keystores") as r:
        assert r.status == 200 and (await r.json())["header"]["isSuccessful"], await r.text()
    # When the server knows how clients reach it (`public_url`), the project says where its client API is.
    import dataclasses
    skm.rt.config = dataclasses.replace(skm.rt.config, public_url="https://keys.example:8443/")
    st, out = await skm.mgmt("POST", "/projects", json={"name": "hinted"})
    assert out["body"]["dataPlaneUrl"] == f"https://keys.example:8443/keymanager/v1.0/appkey/{out['body']['appkey']}"


async def test_audit_of_a_project_operator_holds_its_projects_only(skm, two):
    """`GET /audit` passes the operator's projects to `rt.audit.query(project_ids=...)`; an audit log
    that cannot filter by project refuses a project-scoped reader (fail closed) instead of showing all."""
    import inspect
    sb, kb = two["ids"]["store-b"]["sid"], two["ids"]["store-b"]["kid"]
    st, out = await skm.mgmt("GET", "/audit?limit=1000", token=two["tokens"]["viewer"])
    if "project_ids" not in inspect.signature(skm.rt.audit.query).parameters:
        assert st == 503 and "project" in out["header"]["resultDetail"], out
    else:
        assert st == 200, out
        recs = out["body"]["records"]
        assert recs and all(r.get("keyStoreId") != sb and r.get("keyId") != kb for r in recs)
        assert all(r.get("projectId") in (1, None) for r in recs)
    st, out = await skm.mgmt("GET", f"/audit?keyStoreId={sb}")          # the global admin sees B
    assert st == 200 and out["body"]["records"]


async def test_a_project_operator_finds_its_own_key_changes_in_the_audit(skm, two):
    """Issue 16: management-API key changes are recorded with their project, so a project-scoped operator's
    audit query (and `skm audit query --changes`) holds its project's rotations, updates and scheduled
    deletions, by key and store name, and none of another project's."""
    a, b, tokens = two["a"], two["b"], two["tokens"]
    made = {}
    for proj, token, store in ((a, tokens["admin"], "a-plain"), (b, None, "b-plain")):
        st, out = await skm.mgmt("POST", "/keystores", token=token,
                                 json={"name": store, "ip4AuthUse": "Y", "appkey": proj["appkey"]})
        assert st == 201, out
        sid = out["body"]["keyStoreId"]
        st, out = await skm.mgmt("POST", f"/keystores/{sid}/keys", token=token,
                                 json={"keyType": "SYMMETRIC_KEY", "name": f"{store}-key"})
        assert st == 201, out
        kid = out["body"]["keyId"]
        for method, path, body in (("POST", f"/keys/{kid}/rotate", None),
                                   ("PATCH", f"/keys/{kid}", {"description": "rotated by hand"}),
                                   ("POST", f"/keys/{kid}/schedule-deletion", None)):
            st, out = await skm.mgmt(method, path, json=body, token=token)
            assert st == 200, (path, out)
        made[store] = (sid, kid)
    a_sid, a_kid = made["a-plain"]
    b_sid, b_kid = made["b-plain"]
    for role in ("admin", "viewer"):
        st, out = await skm.mgmt("GET", "/audit?changes=true&limit=1000", token=tokens[role])
        assert st == 200, out
        recs = out["body"]["records"]
        mine = {r["action"] for r in recs if r["keyId"] == a_kid}
        assert {"key.create", "key.rotate", "key.update", "key.schedule-deletion"} <= mine, (role, mine)
        for r in recs:
            assert r["projectId"] == a["id"] and r["keyId"] != b_kid and r["keyStoreId"] != b_sid, (role, r)
            if r["keyId"] == a_kid:
                assert r["detail"]["keyName"] == "a-plain-key" and r["detail"]["keyStoreName"] == "a-plain", r
        for action in ("key.rotate", "key.update", "key.schedule-deletion"):
            st, out = await skm.mgmt("GET", f"/audit?action={action}&result=ok", token=tokens[role])
            assert [r["keyId"] for r in out["body"]["records"]] == [a_kid], (role, action, out)
    # A decision on A's change request is A's record too, by store name.
    rid = two["ids"]["store-a"]["rid"]
    st, out = await skm.mgmt("POST", f"/approvals/{rid}/approve", token=await _token(skm, "appr-store-a"))
    assert st == 200 and out["body"]["status"] == "APPLIED", out
    st, out = await skm.mgmt("GET", "/audit?action=approval.approve", token=tokens["viewer"])
    (rec,) = out["body"]["records"]
    assert rec["projectId"] == a["id"] and rec["detail"]["keyStoreName"] == "store-a", rec
    # The global admin sees both projects' changes, each with its own project.
    st, out = await skm.mgmt("GET", "/audit?action=key.rotate")
    assert {(r["keyId"], r["projectId"]) for r in out["body"]["records"]} >= {(a_kid, a["id"]), (b_kid, b["id"])}


async def test_the_data_plane_url_of_a_server_listening_on_every_address(tmp_path):
    """A data listener bound to 0.0.0.0 has no one address: the URL names the host the operator reached
    the management listener by, with the data listener's real port (no `public_url`)."""
    from tests.support.server import start_harness
    h = await start_harness(tmp_path, data={"host": "0.0.0.0"})
    try:
        port = h.server.data_port
        for host in ("127.0.0.1", "localhost"):
            st, out = await h.mgmt("GET", "/projects/1", headers={"Host": f"{host}:{h.server.mgmt_port}"})
            assert st == 200, out
            assert out["body"]["dataPlaneUrl"] == f"https://{host}:{port}/keymanager/v1.0/appkey/{h.appkey}", out
    finally:
        await h.close()
