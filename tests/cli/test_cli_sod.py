"""Separation of duties and projects as a user meets them: the real `skm` CLI (`python -m
server.cli.main`) against a real server. Each attack of issue 14 is refused with a clear message
and nothing is applied; a project's operator sees nothing of another project."""
from __future__ import annotations

import dataclasses
import json

from tests.access.helpers import access_key, bearer, v12_headers
from tests.cli.test_cli import skm_cli

PW = "a long enough password"


async def _json(skm, *args, **kw):
    code, out, err = await skm_cli(skm, *args, "--json", **kw)
    assert code == 0, (args, out, err)
    return json.loads(out)


async def _login(skm, name: str) -> str:
    code, token, err = await skm_cli(skm, "login", name, stdin=PW + "\n", env={"SKM_TOKEN": ""})
    assert code == 0, err
    return token.strip()


async def _guarded(skm, name: str) -> int:
    ks = (await _json(skm, "keystore", "create", name, "--ip"))["keyStoreId"]
    # The client API's administration passes the store's own checks too: admit this host first.
    code, _, err = await skm_cli(skm, "auth", "ip", "add", str(ks), "127.0.0.1")
    assert code == 0, err
    code, _, err = await skm_cli(skm, "keystore", "update", str(ks), "--approval")
    assert code == 0, err
    return ks


def _fast(skm) -> None:
    skm.rt.operators.configure(dataclasses.replace(skm.rt.operators.settings, argon2_memory_kib=8192,
                                                   argon2_time_cost=1))


async def test_lone_admin_puppet_approver_is_refused_through_the_cli(skm):
    _fast(skm)
    ks = await _guarded(skm, "guarded")
    # Only the admin and its puppet: the change cannot even wait for approval.
    await _json(skm, "operator", "create", "sock", "--role", "approver", "--password-stdin", stdin=PW + "\n")
    sock = await _login(skm, "sock")
    code, _, err = await skm_cli(skm, "key", "create", str(ks), "pw", "--type", "SECRET", stdin="lone-admin\n")
    assert code == 5 and "operators you created" in err, err
    # An approver the admin did not make exists: the request waits; the puppet's approval is refused.
    await skm.rt.operators.create("real", "approver")
    code, _, err = await skm_cli(skm, "key", "create", str(ks), "pw", "--type", "SECRET", stdin="lone-admin\n")
    assert code == 7 and "change request" in err, err
    rid = (await _json(skm, "approval", "list", "--status", "PENDING"))["changeRequests"][0]["changeRequestId"]
    code, _, err = await skm_cli(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": sock})
    assert code == 3 and "created, given a role or handed a credential by the requester" in err, err
    # A puppet approver made after the request: its role is too recent, and it descends from the admin.
    await _json(skm, "operator", "create", "late-sock", "--role", "approver", "--password-stdin", stdin=PW + "\n")
    late = await _login(skm, "late-sock")
    code, _, err = await skm_cli(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": late})
    assert code == 3 and "granted after this change request" in err, err
    cr = await _json(skm, "approval", "show", str(rid))
    assert cr["status"] == "PENDING" and cr["approvals"] == []
    assert (await _json(skm, "key", "list", str(ks)))["keyList"] == []
    # The lineage is visible.
    roles = await _json(skm, "operator", "roles", "sock")
    assert [(g["role"], g["grantedBy"]) for g in roles["grants"]] == [("approver", "admin")]


async def test_reverse_puppet_is_refused_through_the_cli(skm):
    """X, a global admin and (granted by the first admin) approver of the default project, makes a puppet
    admin with `skm operator create`, requests as the puppet, approves as itself: refused, nothing applied."""
    _fast(skm)
    ks = await _guarded(skm, "guarded")
    await skm.rt.operators.create("real", "approver")
    await _json(skm, "operator", "create", "x", "--role", "admin", "--password-stdin", stdin=PW + "\n")
    await _json(skm, "operator", "grant", "x", "--role", "approver", "--project", "default")
    x = await _login(skm, "x")
    await _json(skm, "operator", "create", "puppet", "--role", "admin", "--password-stdin", stdin=PW + "\n",
                env={"SKM_TOKEN": x})
    puppet = await _login(skm, "puppet")
    code, _, err = await skm_cli(skm, "key", "create", str(ks), "by-puppet", "--type", "SYMMETRIC_KEY",
                                 env={"SKM_TOKEN": puppet})
    assert code == 7 and "change request" in err, err
    rid = (await _json(skm, "approval", "list", "--status", "PENDING"))["changeRequests"][0]["changeRequestId"]
    code, _, err = await skm_cli(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": x})
    assert code == 3 and "you created the requester" in err and "does not count" in err, err
    cr = await _json(skm, "approval", "show", str(rid))
    assert cr["status"] == "PENDING" and cr["approvals"] == [] and cr["requestedBy"] == "puppet", cr
    assert (await _json(skm, "key", "list", str(ks)))["keyList"] == []
    assert (await _json(skm, "operator", "show", "puppet"))["createdBy"] == "x"


async def test_one_person_many_credentials_through_the_cli(skm):
    """A global admin who is also the project's approver requests with an access key and a bearer token;
    through the CLI (operator token) the request is theirs: approving refused, cancelling works."""
    ks = await _guarded(skm, "guarded")
    await skm.rt.operators.create("real", "approver")
    dual = await skm.rt.operators.issue_token(await skm.rt.operators.create("dual", "admin"))
    await _json(skm, "operator", "grant", "dual", "--role", "approver", "--project", "default")
    kid, secret = await access_key(skm, operator="dual")
    tok = await bearer(skm, kid, secret)
    for version, headers in (("v1.2", v12_headers(kid, secret)), ("v1.3", {"X-NHN-Authorization": tok})):
        st, out = await skm.client("POST", "/keys/symmetric-keys/create", version=version, headers=headers,
                                   json={"keyStoreName": "guarded", "name": f"k{version[-1]}"})
        assert st == 202, out
        rid = out["body"]["changeRequestId"]
        cr = await _json(skm, "approval", "show", str(rid))
        assert cr["requestedBy"] == "dual", cr
        code, _, err = await skm_cli(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": dual})
        assert code == 3 and "own change request" in err, err
        code, _, err = await skm_cli(skm, "approval", "cancel", str(rid))
        assert code == 3 and "only the requester" in err, err
        done = await _json(skm, "approval", "cancel", str(rid), env={"SKM_TOKEN": dual})
        assert done["status"] == "CANCELLED"
    assert (await _json(skm, "key", "list", str(ks)))["keyList"] == []


async def test_operator_management_under_approval_through_the_cli(skm):
    _fast(skm)
    # Bootstrap (setting off): the first admin makes two admins.
    for name in ("admin-a", "admin-b"):
        await _json(skm, "operator", "create", name, "--role", "admin", "--password-stdin", stdin=PW + "\n")
    a, b = await _login(skm, "admin-a"), await _login(skm, "admin-b")
    svc = skm.rt.changes.approvals
    svc.settings = dataclasses.replace(svc.settings, operators=True)       # [approvals] operators = true
    code, _, err = await skm_cli(skm, "operator", "create", "mallory", "--role", "approver", env={"SKM_TOKEN": a})
    assert code == 7 and "change request" in err, err
    rid = (await _json(skm, "approval", "list", "--status", "PENDING"))["changeRequests"][0]["changeRequestId"]
    code, _, err = await skm_cli(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": a})
    assert code == 3 and "own change request" in err
    code, _, _ = await skm_cli(skm, "operator", "show", "mallory")
    assert code == 4                                                      # nothing applied yet
    assert (await _json(skm, "approval", "approve", str(rid), env={"SKM_TOKEN": b}))["status"] == "APPLIED"
    assert (await _json(skm, "operator", "show", "mallory"))["createdBy"] == "admin-a"
    # A role grant and a token for someone else wait too; the token is collected once by its requester.
    code, _, err = await skm_cli(skm, "operator", "grant", "mallory", "--role", "admin", env={"SKM_TOKEN": a})
    assert code == 7, err
    code, _, err = await skm_cli(skm, "token", "create", "--operator", "mallory", env={"SKM_TOKEN": a})
    assert code == 7, err
    pending = (await _json(skm, "approval", "list", "--status", "PENDING"))["changeRequests"]
    by_op = {c["operation"]: c["changeRequestId"] for c in pending}
    assert set(by_op) == {"operator.grant", "operator.token"}
    assert (await _json(skm, "operator", "show", "mallory"))["role"] == "approver"
    tid = by_op["operator.token"]
    assert (await _json(skm, "approval", "approve", str(tid), env={"SKM_TOKEN": b}))["status"] == "APPLIED"
    code, _, err = await skm_cli(skm, "approval", "collect", str(tid), env={"SKM_TOKEN": b})
    assert code == 3
    got = await _json(skm, "approval", "collect", str(tid), env={"SKM_TOKEN": a})
    assert (await _json(skm, "whoami", env={"SKM_TOKEN": got["token"]}))["name"] == "mallory"
    code, _, err = await skm_cli(skm, "approval", "collect", str(tid), env={"SKM_TOKEN": a})
    assert code == 5 and "collected once" in err


async def test_projects_and_scoped_operators_through_the_cli(skm):
    a_store = (await _json(skm, "keystore", "create", "a-store", "--ip"))["keyStoreId"]
    created = await _json(skm, "project", "create", "team-b", "--description", "second team")
    assert created["appkey"] and created["name"] == "team-b"
    code, out, _ = await skm_cli(skm, "project", "list")
    assert code == 0 and "team-b" in out and created["appkey"] in out
    assert (await _json(skm, "project", "show", "team-b"))["id"] == created["id"]
    await _json(skm, "operator", "create", "ann", "--role", "admin", "--project", "team-b")
    ann = (await _json(skm, "token", "create", "--operator", "ann"))["token"]
    as_ann = {"SKM_TOKEN": ann}
    b_store = (await _json(skm, "keystore", "create", "b-store", "--ip", "--appkey", created["appkey"],
                           env=as_ann))["keyStoreId"]
    # Ann sees team-b only; project A's store is not there for her, and nothing of A changes.
    assert [s["name"] for s in (await _json(skm, "keystore", "list", env=as_ann))["keyStoreList"]] == ["b-store"]
    assert [p["name"] for p in (await _json(skm, "project", "list", env=as_ann))["projects"]] == ["team-b"]
    for args in (("keystore", "show", str(a_store)), ("key", "list", str(a_store)),
                 ("key", "create", str(a_store), "x", "--type", "SYMMETRIC_KEY"),
                 ("keystore", "update", str(a_store), "--description", "mine"), ("project", "show", "default")):
        code, out, err = await skm_cli(skm, *args, env=as_ann)
        assert code == 4 and err.startswith("error:"), (args, out, err)
    for args in (("project", "create", "mine"), ("operator", "grant", "ann", "--role", "admin"),
                 ("operator", "create", "bob", "--role", "viewer", "--project", "team-b")):
        code, _, err = await skm_cli(skm, *args, env=as_ann)
        assert code == 3, (args, err)
    assert (await _json(skm, "key", "list", str(a_store)))["keyList"] == []
    assert (await skm.rt.keys.keystore(a_store)).description == ""
    # The global admin sees both; revoking ann's role ends her view of team-b at once.
    assert {s["name"] for s in (await _json(skm, "keystore", "list"))["keyStoreList"]} == {"a-store", "b-store"}
    await _json(skm, "operator", "revoke", "ann", "--project", "team-b")
    assert (await _json(skm, "keystore", "list", env=as_ann))["keyStoreList"] == []
    code, _, _ = await skm_cli(skm, "keystore", "show", str(b_store), env=as_ann)
    assert code == 4
    hist = await _json(skm, "operator", "roles", "ann")
    assert [(g["role"], g["projectId"], g["revokedBy"]) for g in hist["grants"]] == [("admin", created["id"], "admin")]


def test_new_commands_have_help_and_a_description():
    import argparse
    import subprocess

    from server.cli.main import build_parser
    from tests.cli.test_cli import SKM
    from tests.support.cli import walk_commands
    wanted = {("project", "create"), ("project", "list"), ("project", "show"), ("operator", "grant"),
              ("operator", "revoke"), ("operator", "roles"), ("approval", "collect")}
    found = {tuple(path): p for path, p in walk_commands(build_parser()) if tuple(path) in wanted}
    assert set(found) == wanted
    for path, p in found.items():
        assert isinstance(p, argparse.ArgumentParser) and p.description, path
        r = subprocess.run([*SKM, *path, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage: skm" in r.stdout, (path, r.stderr)
