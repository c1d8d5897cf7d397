"""`skm operator|token|login|whoami|approval|audit` as a user runs them: real processes, a real server."""
from __future__ import annotations

import asyncio
import json
import os
import stat

from tests.cli.test_cli import SKM, skm_cli
from tests.support.cli import help_in_process, walk_commands

MINE = ("operator", "token", "login", "whoami", "approval", "audit")
PW = "a long enough password"


def test_every_operator_command_has_help_and_a_description():
    from server.cli.main import build_parser
    commands = [(path, p) for path, p in walk_commands(build_parser()) if path and path[0] in MINE]
    assert {c[0][0] for c in commands} == set(MINE) and len(commands) >= 20
    for path, p in commands:
        assert p.description, path
        code, out = help_in_process(path)
        assert code == 0 and out.startswith("usage: skm"), (path, out[:200])


async def _json(skm, *args, **kw):
    code, out, err = await skm_cli(skm, *args, "--json", **kw)
    assert code == 0, (args, out, err)
    return json.loads(out)


async def test_operators_tokens_and_login(skm):
    op = await _json(skm, "operator", "create", "ann", "--role", "approver", "--password-stdin", stdin=PW + "\n")
    assert op["name"] == "ann" and op["hasPassword"] is True
    ops = await _json(skm, "operator", "list")
    assert {o["name"]: o["role"] for o in ops["operators"]} == {"admin": "admin", "ann": "approver"}
    code, out, _ = await skm_cli(skm, "operator", "list")
    assert code == 0 and "ann" in out and "approver" in out
    # Login: the token alone on stdout.
    code, token, err = await skm_cli(skm, "login", "ann", stdin=PW + "\n", env={"SKM_TOKEN": ""})
    assert code == 0 and token.strip().startswith("skm_") and "logged in as ann" in err, err
    me = await _json(skm, "whoami", env={"SKM_TOKEN": token.strip()})
    assert me["name"] == "ann" and me["role"] == "approver"
    code, _, err = await skm_cli(skm, "login", "ann", stdin="wrong password!!\n")
    assert code == 3 and "wrong operator name or password" in err
    code, _, err2 = await skm_cli(skm, "login", "nobody", stdin="wrong password!!\n")
    assert code == 3 and err2 == err
    # login --save writes a private config file the next command uses.
    cfg = skm.tmp / "cli.toml"
    code, out, err = await skm_cli(skm, "login", "ann", "--save", stdin=PW + "\n",
                                   env={"SKM_CONFIG": str(cfg), "SKM_TOKEN": ""})
    assert code == 0, err
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600 and "skm_" in cfg.read_text()
    env = {k: v for k, v in os.environ.items() if k not in ("SKM_ADDR", "SKM_TOKEN", "SKM_CACERT")}
    p = await asyncio.create_subprocess_exec(*SKM, "whoami", "--json", env={**env, "SKM_CONFIG": str(cfg)},
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode == 0 and json.loads(out)["name"] == "ann", err
    # Tokens: create, list, revoke; the revoked one stops at once.
    created = await _json(skm, "token", "create", "--description", "ci")
    listed = await _json(skm, "token", "list")
    assert created["tokenId"] in {t["tokenId"] for t in listed["tokens"]}
    code, _, _ = await skm_cli(skm, "whoami", env={"SKM_TOKEN": created["token"]})
    assert code == 0
    code, _, _ = await skm_cli(skm, "token", "revoke", created["tokenId"])
    assert code == 0
    code, _, err = await skm_cli(skm, "whoami", env={"SKM_TOKEN": created["token"]})
    assert code == 3
    # Update and delete.
    upd = await _json(skm, "operator", "update", "ann", "--disable")
    assert upd["disabled"] is True
    code, _, _ = await skm_cli(skm, "whoami", env={"SKM_TOKEN": token.strip()})
    assert code == 3
    code, _, _ = await skm_cli(skm, "operator", "delete", "ann")
    assert code == 0
    code, _, _ = await skm_cli(skm, "operator", "show", "ann")
    assert code == 4


async def test_approval_flow_through_the_cli(skm):
    # An approver the admin did not make, nor hand a token (tests/cli/test_cli_sod.py: one it made does not count).
    rev = await skm.rt.operators.issue_token(await skm.rt.operators.create("rev", "approver"), "test")
    store = await skm.keystore("cli-guarded")
    code, _, err = await skm_cli(skm, "keystore", "update", str(store["keyStoreId"]), "--approval")
    assert code == 0, err
    code, out, err = await skm_cli(skm, "key", "create", str(store["keyStoreId"]), "pw", "--type", "SECRET",
                                   stdin="cli-secret-value\n")
    assert code == 7 and "change request" in err, (out, err)
    pending = await _json(skm, "approval", "list", "--status", "pending")
    rid = pending["changeRequests"][0]["changeRequestId"]
    code, out, _ = await skm_cli(skm, "approval", "show", str(rid))
    assert code == 0 and "secret_value" in out and "cli-secret-value" not in out and "********" in out
    code, _, err = await skm_cli(skm, "approval", "approve", str(rid))
    assert code == 3 and "approver" in err
    done = await _json(skm, "approval", "approve", str(rid), "--comment", "lgtm", env={"SKM_TOKEN": rev})
    assert done["status"] == "APPLIED" and done["approvals"][0]["comment"] == "lgtm"
    # Deny and cancel.
    for _ in range(2):
        code, _, _ = await skm_cli(skm, "key", "create", str(store["keyStoreId"]), "aes", "--type", "SYMMETRIC_KEY")
        assert code == 7
    a, b = [c["changeRequestId"] for c in (await _json(skm, "approval", "list", "--status", "PENDING"))
            ["changeRequests"]]
    assert (await _json(skm, "approval", "deny", str(a), "--comment", "no", env={"SKM_TOKEN": rev}))["status"] == \
        "DENIED"
    assert (await _json(skm, "approval", "cancel", str(b)))["status"] == "CANCELLED"
    # The audit commands see all of it.
    recs = await _json(skm, "audit", "query", "--action", "approval.applied")
    assert [r["detail"]["changeRequestId"] for r in recs["records"]] == [rid]
    code, out, _ = await skm_cli(skm, "audit", "query", "--plane", "mgmt", "--limit", "5")
    assert code == 0 and "admin" in out
    verified = await _json(skm, "audit", "verify")
    assert verified["ok"] is True
