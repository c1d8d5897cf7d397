"""What an audit record says (issue 14/16): semantic actions with names beside ids, the changes
filter, newest first in the CLI, no body HMAC over passwords, no records for console page views,
and every route named in the action table."""
from __future__ import annotations

import hashlib
import hmac
import json

from server.app import client_routes, mgmt_routes
from server.api.routing import path_params
from server.audit.actions import TABLE, lookup
from tests.support.cli import skm_cli


def test_every_route_has_a_semantic_action():
    import importlib
    import pkgutil

    import server.console as console
    missing = []
    for t in (client_routes(), mgmt_routes()):
        for r in t.routes:
            path = path_params(r.path)[0]
            if lookup(r.method, path) is None:
                missing.append(f"{r.method} {path}")
    for m in pkgutil.iter_modules(console.__path__):
        routes = getattr(importlib.import_module(f"server.console.{m.name}"), "routes", None)
        for method, path, _ in getattr(routes, "entries", []):
            if method == "POST" and lookup(method, path_params(path)[0]) is None:
                missing.append(f"{method} {path}")
    assert not missing, "routes without an action in server/audit/actions.py: " + ", ".join(missing)
    assert all("." in a.name and " " not in a.name for a in TABLE.values())


async def test_records_name_the_action_key_and_store(skm):
    store = await skm.keystore("names-store")
    key = await skm.key(store, "SECRET", "db-password", secretValue="named-value-1")
    st, _ = await skm.client("GET", f"/secrets/{key['keyId']}")
    assert st == 200
    st, out = await skm.mgmt("GET", f"/audit?keyId={key['keyId']}")
    recs = out["body"]["records"]
    create = [r for r in recs if r["action"] == "key.create"]
    read = [r for r in recs if r["action"] == "secret.read"]
    assert create and read, [r["action"] for r in recs]
    assert create[0]["change"] is True and read[0]["change"] is False
    for r in create + read:
        assert r["detail"]["keyName"] == "db-password" and r["detail"]["keyStoreName"] == "names-store"
        assert r["projectId"] == store["projectId"] if "projectId" in store else r["projectId"] is not None
    # --changes keeps writes only; a resource name matches all of its actions
    st, out = await skm.mgmt("GET", "/audit?changes=true&limit=1000")
    assert out["body"]["records"] and all(r["change"] for r in out["body"]["records"])
    st, out = await skm.mgmt("GET", "/audit?action=secret&limit=1000")
    assert {r["action"] for r in out["body"]["records"]} == {"secret.read"}


async def test_cli_query_is_newest_first_with_names_and_changes(skm):
    store = await skm.keystore("cli-store")
    await skm.key(store, "SECRET", "first", secretValue="v-first-1")
    await skm.key(store, "SECRET", "second", secretValue="v-second-1")
    code, out, err = await skm_cli(skm, "audit", "query", "--changes", "--json")
    assert code == 0, err
    recs = json.loads(out)["records"]
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(seqs, reverse=True) and all(r["change"] for r in recs)
    code, out, err = await skm_cli(skm, "audit", "query", "--action", "key.create")
    assert code == 0, err
    lines = [l for l in out.splitlines() if "key.create" in l]
    assert "second" in lines[0] and "cli-store" in lines[0] and "first" in lines[1], out


async def test_passwords_get_no_body_hmac(skm):
    st, _ = await skm.mgmt("POST", "/operators", json={"name": "pw-op", "role": "viewer",
                                                       "password": "correct horse battery"})
    assert st in (200, 201)
    st, out = await skm.mgmt("GET", "/audit?action=operator.create")
    rec = out["body"]["records"][-1]
    assert rec["detail"]["bodyOmitted"] == ["password"]
    key = await skm.rt.audit.hmac_key()
    full = json.dumps({"name": "pw-op", "role": "viewer", "password": "correct horse battery"}).encode()
    assert rec["detail"]["bodyHmac"] != "hmac-sha256:" + hmac.new(key, full, hashlib.sha256).hexdigest()
    kept = json.dumps({"name": "pw-op", "role": "viewer"}, separators=(",", ":"), sort_keys=True).encode()
    assert rec["detail"]["bodyHmac"] == "hmac-sha256:" + hmac.new(key, kept, hashlib.sha256).hexdigest()
    store = await skm.keystore("certs-store", certificateAuthUse="Y")
    st, _ = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/certificates",
                           json={"name": "c1", "password": "bundle-password-123"})
    assert st in (200, 201)
    st, out = await skm.mgmt("GET", "/audit?action=cert.create")
    assert out["body"]["records"][-1]["detail"]["bodyOmitted"] == ["password"]


async def test_console_page_views_are_not_records(skm):
    before = await skm.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    async with skm._default().get(skm.mgmt_url + "/console/login") as r:
        assert r.status == 200
    async with skm._default().get(skm.mgmt_url + "/console/keystores", allow_redirects=False) as r:
        assert r.status in (200, 302, 303)
    after = await skm.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    assert after == before
