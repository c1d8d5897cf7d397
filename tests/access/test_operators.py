"""Operators, passwords, login lockout, tokens and roles through the management API."""
from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time


PW = "correct horse battery staple"


async def _login(skm, name: str, password: str, **kw) -> tuple[int, dict]:
    async with skm._default().post(f"{skm.mgmt_url}/api/v1/login", json={"name": name, "password": password},
                                   **kw) as r:
        return r.status, await r.json()


def _fast(skm, **changes) -> None:
    """Cheaper argon2 for tests that log in many times (the policy under test is unchanged)."""
    s = dataclasses.replace(skm.rt.operators.settings, argon2_memory_kib=8192, argon2_time_cost=1, **changes)
    skm.rt.operators.configure(s)


async def test_password_login_issues_a_working_token_and_hashes_with_argon2id(skm):
    st, out = await skm.mgmt("POST", "/operators", json={"name": "ops1", "role": "viewer", "password": PW})
    assert st == 201 and out["body"] == {**out["body"], "name": "ops1", "role": "viewer", "hasPassword": True}
    stored = await skm.rt.storage.fetchval("SELECT password_hash FROM operators WHERE name = 'ops1'")
    assert stored.startswith("$argon2id$") and PW not in stored
    st, out = await _login(skm, "ops1", PW)
    assert st == 200 and out["body"]["role"] == "viewer"
    token = out["body"]["token"]
    st, me = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 200 and me["body"]["name"] == "ops1"
    # Weak passwords are refused.
    st, out = await skm.mgmt("POST", "/operators", json={"name": "ops2", "role": "viewer", "password": "short"})
    assert st == 400
    st, out = await skm.mgmt("POST", "/operators", json={"name": "ops1", "role": "viewer"})
    assert st == 409


async def test_same_error_for_unknown_name_and_wrong_password(skm):
    await skm.mgmt("POST", "/operators", json={"name": "known", "role": "viewer", "password": PW})
    a_st, a = await _login(skm, "known", "wrong password here")
    b_st, b = await _login(skm, "nobody-by-this-name", "wrong password here")
    assert a_st == b_st == 401
    assert a["header"] == b["header"]
    # Similar timing: both run argon2 (the unknown name against a dummy hash).
    times = {"known": [], "unknown": []}
    for _ in range(3):
        for who, name in (("known", "known"), ("unknown", "ghost")):
            t = time.perf_counter()
            await _login(skm, name, "wrong password here")
            times[who].append(time.perf_counter() - t)
    k, u = statistics.median(times["known"]), statistics.median(times["unknown"])
    assert u > 0.3 * k and k > 0.3 * u, times


async def test_lockout_after_n_failures_even_with_the_right_password(skm):
    _fast(skm, max_failures=3, lockout_seconds=600)
    await skm.mgmt("POST", "/operators", json={"name": "lock", "role": "viewer", "password": PW})
    results = [await _login(skm, "lock", "nope-nope-nope") for _ in range(3)]
    assert [st for st, _ in results] == [401, 401, 429]
    st, out = await _login(skm, "lock", PW)
    assert st == 429 and out["header"]["resultMessage"] == "Too Many Attempts"
    # An unknown name behaves the same way, so a lockout reveals nothing.
    ghost = [await _login(skm, "ghost-user", "nope-nope-nope") for _ in range(4)]
    assert [st for st, _ in ghost] == [401, 401, 429, 429]
    assert ghost[2][1]["header"] == results[2][1]["header"]
    st, out = await skm.mgmt("GET", "/operators/lock")
    assert out["body"]["locked"] is True
    # An admin clears the lockout.
    st, out = await skm.mgmt("PATCH", "/operators/lock", json={"unlock": True})
    assert out["body"]["locked"] is False
    st, out = await _login(skm, "lock", PW)
    assert st == 200


async def test_concurrent_wrong_logins_check_at_most_the_limit(skm):
    """The failure count is claimed atomically before the password check: 16 attempts at once
    check at most `max_failures` passwords, and the name ends locked."""
    _fast(skm, max_failures=5, lockout_seconds=600)
    await skm.mgmt("POST", "/operators", json={"name": "flood", "role": "viewer", "password": PW})
    results = await asyncio.gather(*[_login(skm, "flood", f"wrong-password-{i:02d}") for i in range(16)])
    statuses = [st for st, _ in results]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= 4, statuses           # the 5th failure locks (429), never a 6th check
    st, _ = await _login(skm, "flood", PW)
    assert st == 429                                     # locked: the right password is refused too
    row = await skm.rt.storage.fetchone("SELECT a.failures, a.locked_until FROM login_attempts a JOIN operators o "
                                        "ON o.id = a.operator_id WHERE o.name = 'flood' AND a.source = '127.0.0.1'")
    assert row["locked_until"] is not None and row["failures"] == 0
    st, out = await skm.mgmt("PATCH", "/operators/flood", json={"unlock": True})
    assert out["body"]["locked"] is False
    # After the unlock the budget is whole again; a success resets the count.
    for _ in range(3):
        assert (await _login(skm, "flood", "still-wrong-pw"))[0] == 401
    assert (await _login(skm, "flood", PW))[0] == 200
    assert await skm.rt.storage.fetchval("SELECT a.failures FROM login_attempts a JOIN operators o ON "
                                         "o.id = a.operator_id WHERE o.name = 'flood'") == 0


async def test_login_audit_and_approval_settings_are_config_tables(tmp_path):
    from server.access.approvals import ApprovalSettings
    from server.access.operators import LoginSettings
    from server.audit import AuditSettings
    from server.config import load
    from server.settings import ServerConfig
    toml = tmp_path / "server.toml"
    toml.write_text("[login]\nmax_failures = 3\nargon2_time_cost = 1\n[audit]\nfail_closed = false\n"
                    "[approvals]\nexpiry_days = 2.5\n[console]\nidle_seconds = 60\n")
    cfg = load(ServerConfig, toml, env={"SKM_LOGIN_LOCKOUT_SECONDS": "60", "SKM_AUDIT_ENABLED": "0"})
    assert cfg.login == LoginSettings(max_failures=3, argon2_time_cost=1, lockout_seconds=60)
    assert cfg.audit == AuditSettings(enabled=False, fail_closed=False)
    assert cfg.approvals == ApprovalSettings(expiry_days=2.5)
    assert cfg.console.idle_seconds == 60.0
    assert LoginSettings.from_config(cfg) is cfg.login and AuditSettings.from_config(cfg) is cfg.audit
    assert ApprovalSettings.from_config(cfg) is cfg.approvals
    from server.settings import ConsoleSettings
    assert ConsoleSettings.from_config(cfg) is cfg.console
    # The defaults, and the environment alone when there is no config (the old SKM_* names).
    assert load(ServerConfig, None, env={}).login == LoginSettings()
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"SKM_APPROVALS_WEBHOOK_RETRIES": "7"}):
        assert ApprovalSettings.from_config(None).webhook_retries == 7


async def test_the_servers_login_policy_comes_from_the_config(skm):
    assert skm.rt.operators.settings == skm.rt.config.login
    assert skm.rt.audit.settings == skm.rt.config.audit
    assert skm.rt.approvals.settings == skm.rt.config.approvals


async def test_login_rate_limit_per_address(skm):
    _fast(skm, rate_per_minute=4, max_failures=100)
    statuses = [(await _login(skm, f"n{i}", "whatever-whatever"))[0] for i in range(6)]
    assert statuses == [401, 401, 401, 401, 429, 429]


async def test_revoked_token_stops_at_once_and_tokens_list(skm):
    st, out = await skm.mgmt("POST", "/tokens", json={"description": "ci", "expiresInDays": 1})
    assert st == 201
    token, tid = out["body"]["token"], out["body"]["tokenId"]
    st, _ = await skm.mgmt("GET", "/keystores", token=token)
    assert st == 200
    st, out = await skm.mgmt("GET", "/tokens")
    listed = {t["tokenId"]: t for t in out["body"]["tokens"]}
    assert listed[tid]["status"] == "ACTIVE" and listed[tid]["description"] == "ci"
    assert token not in str(out) and all("token" not in t for t in out["body"]["tokens"])
    st, _ = await skm.mgmt("DELETE", f"/tokens/{tid}")
    assert st == 200
    st, out = await skm.mgmt("GET", "/keystores", token=token)
    assert st == 401
    st, out = await skm.mgmt("GET", "/tokens")
    assert {t["tokenId"]: t for t in out["body"]["tokens"]}[tid]["status"] == "REVOKED"


async def test_disabled_operator_and_deleted_operator_lose_access(skm):
    await skm.mgmt("POST", "/operators", json={"name": "temp", "role": "admin"})
    st, out = await skm.mgmt("POST", "/tokens", json={"operator": "temp"})
    token = out["body"]["token"]
    st, _ = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 200
    await skm.mgmt("PATCH", "/operators/temp", json={"disabled": True})
    st, _ = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 401
    await skm.mgmt("PATCH", "/operators/temp", json={"disabled": False})
    st, _ = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 200
    # The last admin cannot lock everyone out.
    st, out = await skm.mgmt("PATCH", "/operators/admin", json={"role": "viewer"})
    assert st == 409
    st, out = await skm.mgmt("DELETE", "/operators/temp")
    assert st == 200
    st, _ = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 401
    st, _ = await skm.mgmt("GET", "/operators/temp")
    assert st == 404


async def test_viewer_reads_metadata_only(skm):
    store = await skm.keystore("vstore")
    key = await skm.key(store, "SECRET", "pw", secretValue="viewer-must-not-see")
    await skm.mgmt("POST", "/operators", json={"name": "val", "role": "viewer"})
    await skm.mgmt("POST", "/operators", json={"name": "apr", "role": "approver"})
    viewer = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("val"))
    approver = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("apr"))
    sid, kid = store["keyStoreId"], key["keyId"]
    for path in ("/keystores", f"/keystores/{sid}", f"/keystores/{sid}/keys", f"/keys/{kid}", "/operators",
                 "/approvals", "/audit"):
        st, out = await skm.mgmt("GET", path, token=viewer)
        assert st == 200, (path, out)
        assert "viewer-must-not-see" not in str(out)
    writes = [("POST", "/keystores", {"name": "v2", "ip4AuthUse": "Y"}),
              ("PATCH", f"/keystores/{sid}", {"description": "x"}),
              ("POST", f"/keystores/{sid}/keys", {"keyType": "SYMMETRIC_KEY", "name": "k"}),
              ("POST", f"/keys/{kid}/rotate", {"secretValue": "x"}),
              ("POST", f"/keys/{kid}/schedule-deletion", None),
              ("POST", f"/keystores/{sid}/auths/ipv4s", {"value": "10.0.0.1"}),
              ("POST", "/operators", {"name": "evil", "role": "admin"}),
              ("PATCH", "/operators/val", {"role": "admin"}),
              ("POST", f"/keys/{kid}/reveal", None)]
    for token in (viewer, approver):
        for method, path, body in writes:
            st, out = await skm.mgmt(method, path, json=body, token=token)
            assert st == 403, (method, path, out)
            assert "viewer-must-not-see" not in str(out)
    assert (await skm.rt.keys.key(kid)).current_version == 0
    # An admin's reveal works and is audited as a reveal.
    st, out = await skm.mgmt("POST", f"/keys/{kid}/reveal")
    assert st == 200 and out["body"]["secretValue"] == "viewer-must-not-see"
    st, out = await skm.mgmt("GET", "/audit?action=key.reveal")
    results = [(r["actor"], r["result"], r["keyId"]) for r in out["body"]["records"]]
    assert results == [("val", "denied", kid), ("apr", "denied", kid), ("admin", "ok", kid)]


async def test_non_admin_changes_only_their_own_password(skm):
    _fast(skm)
    await skm.mgmt("POST", "/operators", json={"name": "self", "role": "approver", "password": PW})
    token = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("self"))
    st, out = await skm.mgmt("PATCH", "/operators/self", token=token, json={"password": "a brand new password"})
    assert st == 400
    st, out = await skm.mgmt("PATCH", "/operators/self", token=token,
                             json={"password": "a brand new password", "currentPassword": "not it at all"})
    assert st == 403
    st, out = await skm.mgmt("PATCH", "/operators/self", token=token,
                             json={"password": "a brand new password", "currentPassword": PW})
    assert st == 200
    st, _ = await _login(skm, "self", "a brand new password")
    assert st == 200
    st, out = await skm.mgmt("PATCH", "/operators/admin", token=token, json={"password": "x" * 12})
    assert st == 403
    # The checks issued no tokens on the side: only the login above.
    tokens = await skm.rt.operators.tokens((await skm.rt.operators.by_name("self")).id)
    assert len(tokens) == 2


def test_roles_cover_their_project_and_global_grants_everywhere():
    from server.access.operators import Grant, Operator
    op = Operator(7, "ann", "", None, (Grant("viewer", 1), Grant("admin", 2)))
    assert op.has(("viewer",), 1) and not op.has(("admin",), 1)
    assert op.has(("admin",), 2) and not op.has(("viewer",), 2)
    assert not op.has(("viewer", "admin"), 3) and not op.has(("viewer", "admin"))
    assert op.roles_in(1) == frozenset({"viewer"}) and op.roles_in(1) is op.roles_in(1)   # memoised
    glob = Operator(8, "bob", "approver")
    assert glob.has(("approver",), 5) and glob.has(("approver",)) and not glob.has(("admin",), 5)
