"""What an audit record says (issue 14/16): semantic actions with names beside ids, the changes
filter, newest first in the CLI, no body HMAC over passwords, no records for console page views,
and every route named in the action table.

Password bodies (issue 14): every request model marks its password fields sensitive, and operator
create, a password reset (PATCH), `skm login` and the console's change-password form each leave a
record whose body HMAC covers no password (login: no body HMAC at all), while an ordinary write keeps
the HMAC of its body as sent."""
from __future__ import annotations

import hashlib
import hmac
import json

from server.app import client_routes, mgmt_routes
from server.api.routing import path_params
from server.audit.actions import TABLE, lookup
from server.audit.middleware import sensitive_fields
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


async def test_every_management_record_on_a_key_or_store_names_it_and_its_project(skm):
    """Issue 16: management-API records of key and key-store operations carry the key's and the store's
    names and the project (a project-scoped operator's audit query filters on it)."""
    store = await skm.keystore("named-store", certificateAuthUse="Y")
    sid, name = store["keyStoreId"], "named-store"
    project = (await skm.rt.keys.keystore(sid)).project_id
    secret = await skm.key(store, "SECRET", "named-secret", secretValue="named-value-1")
    aes = await skm.key(store, "SYMMETRIC_KEY", "named-aes")
    kid, aid = secret["keyId"], aes["keyId"]
    key_ops = [  # (method, path, body, action, the key's name)
        ("GET", f"/keys/{kid}", None, "key.read", "named-secret"),
        ("PATCH", f"/keys/{kid}", {"description": "changed"}, "key.update", "named-secret"),
        ("POST", f"/keys/{kid}/rotate", {"secretValue": "named-value-2"}, "key.rotate", "named-secret"),
        ("POST", f"/keys/{kid}/reveal", None, "key.reveal", "named-secret"),
        ("GET", f"/keys/{kid}/rollout", None, "key.rollout", "named-secret"),
        ("GET", f"/usage?keyId={kid}", None, "usage.read", "named-secret"),
        ("POST", f"/keys/{aid}/rotate", None, "key.rotate", "named-aes"),
        ("POST", f"/keys/{aid}/versions/0/disable", None, "key.version-disable", "named-aes"),
        ("POST", f"/keys/{aid}/versions/0/enable", None, "key.version-enable", "named-aes"),
        ("POST", f"/keys/{kid}/schedule-deletion", None, "key.schedule-deletion", "named-secret"),
        ("POST", f"/keys/{kid}/cancel-deletion", None, "key.cancel-deletion", "named-secret"),
        ("POST", f"/keys/{aid}/schedule-deletion", None, "key.schedule-deletion", "named-aes"),
        ("DELETE", f"/keys/{aid}", None, "key.delete", "named-aes"),
        ("POST", f"/keys/{kid}/schedule-deletion", None, "key.schedule-deletion", "named-secret"),
        ("DELETE", f"/keys/{kid}", None, "key.delete", "named-secret"),
    ]
    store_ops = [  # (method, path, body, action)
        ("GET", f"/keystores/{sid}", None, "keystore.read"),
        ("PATCH", f"/keystores/{sid}", {"description": "changed"}, "keystore.update"),
        ("GET", f"/keystores/{sid}/keys", None, "key.list"),
        ("GET", f"/keystores/{sid}/auths/ipv4s", None, "auth.list"),
        ("POST", f"/keystores/{sid}/auths/ipv4s", {"value": "10.1.2.3"}, "auth.add"),
        ("POST", f"/keystores/{sid}/auths/ipv4s/schedule-deletion", {"value": "10.1.2.3"}, "auth.schedule-deletion"),
        ("POST", f"/keystores/{sid}/auths/ipv4s/cancel-deletion", {"value": "10.1.2.3"}, "auth.cancel-deletion"),
        ("POST", f"/keystores/{sid}/certificates", {"name": "c1", "password": "bundle-password-123"}, "cert.create"),
        ("GET", f"/keystores/{sid}/certificates", None, "cert.list"),
        ("GET", f"/keystores/{sid}/certificates/c1", None, "cert.read"),
        ("GET", f"/keystores/{sid}/certificates/c1/bundle", None, "cert.download"),
        ("POST", f"/keystores/{sid}/certificates/schedule-deletion", {"name": "c1"}, "cert.schedule-deletion"),
        ("POST", f"/keystores/{sid}/certificates/cancel-deletion", {"name": "c1"}, "cert.cancel-deletion"),
        ("GET", f"/usage?keyStoreId={sid}", None, "usage.read"),
    ]
    seen = []
    for method, path, body, action, key_name in [*key_ops, *((m, p, b, a, None) for m, p, b, a in store_ops)]:
        before = await skm.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        if path.endswith("/bundle"):           # PKCS#12, not JSON
            async with skm._default().get(f"{skm.mgmt_url}/api/v1{path}",
                                          headers={"Authorization": f"Bearer {skm.init.token}"}) as resp:
                st, out = resp.status, await resp.read()
        else:
            st, out = await skm.mgmt(method, path, json=body)
        assert st < 300, (method, path, out)
        st, out = await skm.mgmt("GET", f"/audit?action={action}&afterSeq={before}")
        recs = [r for r in out["body"]["records"] if r["plane"] == "mgmt"]
        assert len(recs) == 1, (method, path, [r["action"] for r in out["body"]["records"]])
        r = recs[0]
        assert r["projectId"] == project and r["keyStoreId"] == sid, (action, r)
        assert r["detail"].get("keyStoreName") == name, (action, r)
        if key_name is not None:
            assert r["detail"].get("keyName") == key_name and r["keyId"] in (kid, aid), (action, r)
        seen.append(action)
    # The store's deletion, last: its record still names it (it is gone when the record is written).
    st, out = await skm.mgmt("POST", f"/keystores/{sid}/certificates/schedule-deletion", json={"name": "c1"})
    st, out = await skm.mgmt("POST", f"/keystores/{sid}/certificates/delete", json={"name": "c1"})
    assert st == 200, out
    st, out = await skm.mgmt("DELETE", f"/keystores/{sid}")
    assert st == 200, out
    st, out = await skm.mgmt("GET", "/audit?action=keystore.delete&order=desc&limit=1")
    r = out["body"]["records"][0]
    assert r["result"] == "ok" and r["keyStoreId"] == sid and r["projectId"] == project, r
    assert r["detail"]["keyStoreName"] == name, r
    assert {a for *_, a, _ in key_ops} | {a for *_, a in store_ops} <= set(seen)


async def test_an_unknown_action_filter_is_refused(skm):
    """`GET /audit?action=` with a name no record can carry is a 400 naming close ones, not an empty page."""
    for bad, close in (("nosuch.action", "key"), ("key.rotat", "key.rotate"), ("secrt", "secret")):
        st, out = await skm.mgmt("GET", f"/audit?action={bad}")
        assert st == 400 and not out["header"]["isSuccessful"], (bad, out)
        assert bad in out["header"]["resultDetail"] and close in out["header"]["resultDetail"], (bad, out)
    for good in ("key.rotate", "key", "approval.applied", "auth.cancel-deletion", "operator.unlock",
                 "sidecar.reads-dropped", "secret.read"):
        st, out = await skm.mgmt("GET", f"/audit?action={good}")
        assert st == 200, (good, out)


def test_every_action_a_record_can_carry_is_a_known_filter():
    """The names `{action}` routes fill in (the console's alternatives) are known to the filter check."""
    import importlib
    import pkgutil
    import re

    import server.console as console
    from server.audit.actions import check_filter, known_actions
    for m in pkgutil.iter_modules(console.__path__):
        routes = getattr(importlib.import_module(f"server.console.{m.name}"), "routes", None)
        for method, path, _ in getattr(routes, "entries", []):
            found = re.search(r"\{action:([a-z|-]+)\}", path)
            act = lookup(method, path_params(path)[0]) if method == "POST" else None
            if found is None or act is None:
                continue
            for verb in found.group(1).split("|"):
                name = act.name.split(".")[0] + "." + verb
                assert name in known_actions() and check_filter(name) is None, (path, name)
    assert all(check_filter(a.name) is None for a in TABLE.values() if "{" not in a.name)


# Field names that carry a password or PIN, however a model spells them (matched without case, "_" or "-").
_PASSWORDISH = ("password", "passwd", "passphrase", "pin", "pincode")


def _passwordish(field: str) -> bool:
    n = field.lower().replace("_", "").replace("-", "")
    return n in _PASSWORDISH or any(n.endswith(p) for p in ("password", "passwd", "passphrase", "pin"))


def test_every_password_field_is_marked_sensitive():
    """The name rule in the middleware is a second line: each model says which of its fields are passwords."""
    unmarked, seen = [], 0
    for t in (client_routes(), mgmt_routes()):
        for r in t.routes:
            if r.body is None:
                continue
            marked = sensitive_fields(r.body)
            for name, f in r.body.model_fields.items():
                if _passwordish(name) or (f.alias and _passwordish(f.alias)):
                    seen += 1
                    if name not in marked:
                        unmarked.append(f"{r.method} {r.path}: {r.body.__name__}.{name}")
    assert seen >= 5, seen        # login, operator create, update (new and current), certificate create
    assert not unmarked, "password fields without json_schema_extra={'sensitive': True}: " + ", ".join(unmarked)


async def _newest(skm, action: str) -> dict:
    st, out = await skm.mgmt("GET", f"/audit?action={action}&limit=1000")
    assert st == 200, out
    recs = [r for r in out["body"]["records"] if r["action"] == action]
    assert recs, f"no {action} record"
    return max(recs, key=lambda r: r["seq"])


def _mac(key: bytes, body: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _canonical(data: dict) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _assert_covers_no_password(rec: dict, key: bytes, sent: bytes, kept: bytes, omitted: list[str],
                               *passwords: str) -> None:
    """The record's body HMAC is the one over the body without its password fields, never the one over
    the body as sent, and no password appears anywhere in the record."""
    d = rec["detail"]
    assert d["bodyOmitted"] == omitted, d
    assert d["bodyHmac"] == _mac(key, kept) and d["bodyHmac"] != _mac(key, sent), d
    text = json.dumps(rec)
    assert not any(p in text for p in passwords), rec


async def test_operator_create_and_password_reset_hmac_no_password(skm):
    key = await skm.rt.audit.hmac_key()
    body = {"name": "reset-op", "role": "viewer", "password": "first pass phrase 1"}
    sent = json.dumps(body).encode()
    async with skm._default().post(f"{skm.mgmt_url}/api/v1/operators", data=sent, headers={
            "Authorization": f"Bearer {skm.init.token}", "Content-Type": "application/json"}) as r:
        assert r.status in (200, 201), await r.text()
    rec = await _newest(skm, "operator.create")
    _assert_covers_no_password(rec, key, sent, _canonical({"name": "reset-op", "role": "viewer"}), ["password"],
                               "first pass phrase 1")
    # A reset by an admin (PATCH with the new password), twice with different passwords: the same HMAC,
    # so nothing in it depends on the password.
    macs = []
    for pw in ("second pass phrase 2", "third pass phrase 33"):
        st, out = await skm.mgmt("PATCH", "/operators/reset-op", json={"password": pw})
        assert st == 200, out
        rec = await _newest(skm, "operator.update")
        _assert_covers_no_password(rec, key, json.dumps({"password": pw}).encode(), _canonical({}), ["password"], pw)
        macs.append(rec["detail"]["bodyHmac"])
    assert macs[0] == macs[1]
    # The operator's own change (password and currentPassword) leaves both out.
    st, out = await skm.mgmt("POST", "/login", json={"name": "reset-op", "password": "third pass phrase 33"})
    assert st == 200, out
    own = out["body"]["token"]
    mine = {"password": "fourth pass phrase 4", "currentPassword": "third pass phrase 33"}
    st, out = await skm.mgmt("PATCH", "/operators/reset-op", json=mine, token=own)
    assert st == 200, out
    rec = await _newest(skm, "operator.update")
    _assert_covers_no_password(rec, key, json.dumps(mine).encode(), _canonical({}), ["currentPassword", "password"],
                               "fourth pass phrase 4", "third pass phrase 33")


async def test_skm_login_leaves_no_body_hmac(skm):
    st, _ = await skm.mgmt("POST", "/operators", json={"name": "cli-login", "role": "viewer",
                                                       "password": "cli login pass 1"})
    assert st in (200, 201)
    code, out, err = await skm_cli(skm, "login", "cli-login", "--json", stdin=b"cli login pass 1\n")
    assert code == 0, err
    rec = await _newest(skm, "operator.login")
    assert rec["actor"] == "cli-login" and rec["result"] == "ok", rec
    assert "bodyHmac" not in rec["detail"] and "cli login pass 1" not in json.dumps(rec), rec


async def test_console_password_form_hmac_covers_no_password(skm):
    import re

    import aiohttp

    from server.access.tls import client_context
    await skm.rt.operators.update("admin", password="console old pass 1")
    jar = aiohttp.CookieJar(unsafe=True)          # the console's cookies on 127.0.0.1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(skm.pki.ca_cert)),
                                     cookie_jar=jar) as s:
        base = skm.mgmt_url + "/console"

        async def csrf(path: str) -> str:
            async with s.get(base + path) as r:
                assert r.status == 200, path
                m = re.search(r'name="_csrf" value="([^"]+)"', await r.text())
                assert m, path
                return m.group(1)

        async with s.post(base + "/login", data={"_csrf": await csrf("/login"), "name": "admin",
                                                 "password": "console old pass 1"}, allow_redirects=False) as r:
            assert r.status in (302, 303), await r.text()
        rec = await _newest(skm, "operator.login")
        assert rec["plane"] == "mgmt" and "bodyHmac" not in rec["detail"], rec
        token = await csrf("/me")
        form = [("_csrf", token), ("current_password", "console old pass 1"),
                ("new_password", "console new pass 2"), ("new_password2", "console new pass 2")]
        async with s.post(base + "/me/password", data=form, allow_redirects=False) as r:
            assert r.status in (200, 302, 303), await r.text()
    rec = await _newest(skm, "operator.password-change")
    assert rec["result"] == "ok", rec
    from urllib.parse import urlencode
    key = await skm.rt.audit.hmac_key()
    _assert_covers_no_password(rec, key, urlencode(form).encode(), urlencode([("_csrf", token)]).encode(),
                               ["current_password", "new_password", "new_password2"],
                               "console old pass 1", "console new pass 2")
    # The new password works: the form did what the record says.
    st, _ = await skm.mgmt("POST", "/login", json={"name": "admin", "password": "console new pass 2"})
    assert st == 200


async def test_an_ordinary_write_keeps_its_body_hmac(skm):
    store = await skm.keystore("plain-write")
    sent = json.dumps({"keyType": "SECRET", "name": "plain", "secretValue": "plain-value-12345"}).encode()
    async with skm._default().post(f"{skm.mgmt_url}/api/v1/keystores/{store['keyStoreId']}/keys", data=sent,
                                   headers={"Authorization": f"Bearer {skm.init.token}",
                                            "Content-Type": "application/json"}) as r:
        assert r.status == 201, await r.text()
    rec = await _newest(skm, "key.create")
    key = await skm.rt.audit.hmac_key()
    assert rec["detail"]["bodyHmac"] == _mac(key, sent) and "bodyOmitted" not in rec["detail"], rec


def test_every_action_named_in_the_code_is_a_known_filter():
    """An action written outside the route table (`rt.audit.event("...")`, an approval's `_audit("...")`,
    `request[AUDIT_ACTION] = "..."`, a record's `"action": "..."`) is in actions.py's EVENTS or TABLE, so
    `GET /audit?action=` accepts it (an unknown name is refused)."""
    import re
    from pathlib import Path

    from server.audit.actions import check_filter
    root = Path(__file__).resolve().parents[2] / "server"
    pattern = re.compile(r"""(?:\.event\(|_audit\(|AUDIT_ACTION\] = |"action": |_ACTION = )f?"([a-z][a-z0-9.{}_-]*)\"""")
    named = set()
    for path in root.rglob("*.py"):
        for name in pattern.findall(path.read_text()):
            if "{" not in name:
                named.add(name)
    assert {"backup.start", "approval.requested", "sidecar.reads-dropped"} <= named, named
    assert not [n for n in sorted(named) if check_filter(n) is not None]


def test_a_digest_from_the_body_encoded_ahead_is_the_record_digest():
    """Writers turn a record into its stored row and encode the row's fields before they take the chain's
    head (server/audit/log.py), adding `seq` and `prev_hash` under the lock: the digest and tag must be
    exactly those a verifier recomputes from the stored row, for any values (escapes, non-ASCII, None,
    numbers sent as text, a bool status, an over-long reason)."""
    import os

    import pytest

    from server.audit.record import canon_body, chained_digest, digest, make_row, tag, tagger
    records = [
        dict(at="2026-11-30T03:41:49.757479Z", plane="data", actor="appkey", actor_kind="client",
             ip="127.0.0.1", method="GET", route="/x/{keyid}", action="secret.read", project_id=3,
             keystore_id="12", key_id="k\u00e9y", change=False, status=200, result="ok",
             detail={"keyName": 'n"q', "a": 1}, extra="not a field"),
        dict(at="t", plane="mgmt", actor='a"b\\c\n', actor_kind="operator", action="a.b",
             reason="\u2603 \x00 </script>" * 300, result="refused", status=True),
    ]
    key = os.urandom(32)
    tag_of = tagger(key)
    for seq, prev, rec in ((1, "0" * 64, records[0]), (10**12, "ab" * 32, records[1])):
        row = make_row(rec)
        stored = dict(row, seq=seq, prev_hash=prev)
        want = digest(stored)
        assert chained_digest(seq, canon_body(row), prev) == want
        assert tag_of(want) == tag(key, want)
    first, second = make_row(records[0]), make_row(records[1])
    assert (first["keystore_id"], first["change"], first["detail"]) == (12, 0, '{"a":1,"keyName":"n\\"q"}')
    assert "extra" not in first and second["detail"] == "{}" and second["status"] == 1
    assert len(second["reason"]) == 1000 and second["key_id"] is None
    changed = dict(records[0], status=201)
    assert chained_digest(1, canon_body(make_row(changed)), "0" * 64) != digest(dict(first, seq=1, prev_hash="0" * 64))
    with pytest.raises(ValueError):
        make_row(dict(records[0], keystore_id="12; DROP"))     # refused before it joins a batch


async def test_a_record_with_a_bad_integer_field_is_refused_before_it_joins_a_batch(tmp_path):
    """`make_row` checks the integer fields when a record is made: a bad one fails its own append (and,
    for `append_many`, queues none of its records), never the batch it would have been written with."""
    import asyncio

    import pytest

    from tests.support.audit_writer import sqlite_audit
    async with sqlite_audit(tmp_path) as (storage, audit):
        def rec(i, **kw):
            return {"plane": "system", "actor": "t", "actor_kind": "system", "action": "test.int", "result": "ok",
                    "detail": {"i": i}, **kw}
        good = asyncio.ensure_future(audit.append(rec(1, keystore_id="7")))      # digits as text: taken as 7
        with pytest.raises(ValueError):
            await audit.append(rec(2, keystore_id="7; DROP"))
        with pytest.raises(ValueError):
            await audit.append_many([rec(3), rec(4, status="two hundred"), rec(5)])
        assert await good > 0
        rows = await storage.fetchall("SELECT keystore_id, detail FROM audit_log WHERE action = 'test.int'")
        assert [(r["keystore_id"], r["detail"]) for r in rows] == [(7, '{"i":1}')]


def test_a_value_neither_the_canonical_form_nor_postgresql_can_hold_is_stored_escaped():
    """A NUL (PostgreSQL's text refuses it) and a lone surrogate (UTF-8 cannot encode it; aiohttp makes one of
    every header byte that is not UTF-8) become backslash escapes when the record is made, in every text
    field; any other text, control characters and non-ASCII included, is stored as given."""
    from server.audit.record import canon_body, chained_digest, digest, make_row
    from server.text import storable
    assert storable("aa\udcffbb") == "aa\\xffbb"          # the byte the client sent
    assert storable("k\ud800") == "k\\ud800"
    assert storable("a\x00b") == "a\\x00b"
    for ordinary in ("plain", "café 東京 🔑", "esc\x1b[2J tab\t nl\n", ""):
        assert storable(ordinary) == ordinary
        assert make_row({"actor": ordinary, "reason": ordinary})["actor"] == ordinary
    row = make_row({"at": "t\x00", "plane": "data", "actor": "a\x00", "mac": "aa\udcffbb", "key_id": "abc\x00def",
                    "method": "G\udcffT", "reason": "\udcff" * 2000, "detail": {"exe": "/bin/x\x00\udcff"}})
    assert (row["at"], row["actor"], row["mac"], row["key_id"], row["method"]) == (
        "t\\x00", "a\\x00", "aa\\xffbb", "abc\\x00def", "G\\xffT")
    assert row["reason"] == "\\xff" * 250                  # escaped, then cut to the field's 1,000 characters
    assert row["detail"] == '{"exe":"/bin/x\\u0000\\udcff"}'  # JSON text: escaped by its encoder already
    body = canon_body(row)                                   # encodes: before, this raised for the whole batch
    assert chained_digest(1, body, "0" * 64) == digest(dict(row, seq=1, prev_hash="0" * 64))


async def test_a_record_with_a_nul_or_a_stray_byte_fails_no_other_record_of_its_batch(storage_url):
    """On both backends: records with a NUL and a non-UTF-8 header byte are written in one batch with ordinary
    ones; every append succeeds, each value is stored as its escape, and the keyed chain verifies."""
    import asyncio

    from server.audit import verify_chain
    from tests.support.audit_writer import storage_audit
    async with storage_audit(storage_url) as (storage, audit):
        def rec(i, **kw):
            return {"plane": "data", "actor": "appkey", "actor_kind": "client", "action": "secret.read",
                    "result": "ok", "status": 200, "detail": {"i": i}, **kw}
        recs = [rec(0), rec(1, mac="aa\udcffbb"), rec(2), rec(3, key_id="abc\x00def", reason="no\x00such"), rec(4)]
        seqs = await asyncio.gather(*(audit.append(r) for r in recs))
        assert sorted(seqs) == list(range(1, 6))       # every one written, numbered without a gap
        rows = await storage.fetchall("SELECT mac, key_id, reason, detail FROM audit_log WHERE action = "
                                      "'secret.read' ORDER BY seq")
        assert [(r["mac"], r["key_id"], r["reason"]) for r in rows] == [
            (None, None, None), ("aa\\xffbb", None, None), (None, None, None),
            (None, "abc\\x00def", "no\\x00such"), (None, None, None)]
        assert [r["detail"] for r in rows] == [f'{{"i":{i}}}' for i in range(5)]
        result = await verify_chain(storage, key=await audit.link_key())
        assert result.ok and result.checked == 5, result.to_api()


async def test_every_field_is_stored_as_the_record_was_made_on_both_backends(storage_url):
    """PostgreSQL takes a row's columns out of the canonical form the digest was computed over (one JSON text
    per record, server/audit/log.py): quotes, backslashes, escapes, control characters, non-ASCII, NULLs,
    large integers and nested details come back exactly as `make_row` made them, and the chain verifies."""
    import asyncio

    from server.audit import verify_chain
    from server.audit.record import ROW_FIELDS, make_row
    from tests.support.audit_writer import storage_audit
    odd = 'q"uote \\back\\slash \\u0000 \\n é 東京 🔑 \u2028 \x1b[2J\ttab\nline \x7f'
    recs = [
        {"at": "2026-11-30T14:00:00.000001Z", "plane": "mgmt", "actor": odd, "actor_kind": "operator", "ip": "::1",
         "fingerprint": "ab" * 32, "mac": "aa:bb:cc:dd:ee:ff", "method": "PATCH", "route": "/keystores/{keystore_id}",
         "action": "key.update", "project_id": 2**40, "keystore_id": 0, "key_id": "k'; DROP TABLE audit_log; --",
         "change": True, "status": 599, "result": "refused", "reason": odd * 20,
         "detail": {"nested": {"list": [1, -2, 3.5, None, True, odd]}, "é": "\\", "big": 2**62}},
        {"plane": "system", "actor": "", "actor_kind": "system", "action": "x", "change": False, "status": 0,
         "result": "", "detail": {}},
        {"plane": "data", "actor": "a", "actor_kind": "client", "action": "y", "result": "ok"},
    ]
    async with storage_audit(storage_url) as (storage, audit):
        seqs = await asyncio.gather(*(audit.append(r) for r in recs))
        for seq, rec in zip(seqs, recs):
            stored = dict(await storage.fetchone("SELECT * FROM audit_log WHERE seq = ?", seq))
            made = make_row(rec)
            if rec.get("at") is None:
                made["at"] = stored["at"]                # the writer's clock
            assert {f: stored[f] for f in ROW_FIELDS} == made, seq
        result = await verify_chain(storage, key=await audit.link_key())
        assert result.ok and result.checked == 3, result.to_api()
