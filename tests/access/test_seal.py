"""Whoever can write the database, without the system key, cannot make themselves an operator, raise a
role, set a password, re-enable an operator or stretch a credential (server/access/seal.py). Each test
plays that attacker with plain SQL on the server's own database, then uses the server as a client."""
from __future__ import annotations

import contextlib
import hashlib

import pytest
from argon2 import PasswordHasher

from server.access.seal import AccessSeal
from server.app import KeyServer
from server.errors import BarrierError, Conflict
from server.init import init_server
from server.storage.factory import open_storage
from tests.access.helpers import access_key, bearer, v12_headers
from tests.access.test_operators import PW, _login
from tests.api.test_client_api import assert_ok
from tests.support.server import Harness, make_config


async def _seal_failures(skm, table: str) -> float:
    return await skm.metric("skm_access_seal_failures_total", table=table)


async def test_a_token_row_written_into_the_database_authenticates_nobody(skm):
    db = skm.rt.storage
    admin_id = await db.fetchval("SELECT id FROM operators WHERE name = 'admin'")
    real = await db.fetchone("SELECT seal, created_at FROM operator_tokens WHERE operator_id = ?", admin_id)
    mine = "attacker-chosen-secret-of-43-characters-xxxx"
    digest = hashlib.sha256(mine.encode()).hexdigest()
    # Without a seal, and with the seal of the admin's real token copied over.
    for token_id, seal in (("deadbeefdeadbeef", None), ("feedfacefeedface", real["seal"])):
        await db.execute("INSERT INTO operator_tokens (id, operator_id, secret_hash, description, expires_at, "
                         "created_at, seal) VALUES (?, ?, ?, '', NULL, ?, ?)", token_id, admin_id, digest,
                         real["created_at"], seal)
        st, out = await skm.mgmt("GET", "/whoami", token=f"skm_{token_id}_{mine}")
        assert st == 401 and "not valid" in out["header"]["resultDetail"], out
        st, out = await skm.mgmt("POST", "/keystores", json={"name": "x", "ip4AuthUse": "N"},
                                 token=f"skm_{token_id}_{mine}")
        assert st == 401, out
    assert await _seal_failures(skm, "operator_tokens") >= 2
    assert await db.fetchval("SELECT COUNT(*) AS n FROM keystores WHERE name = 'x'") == 0
    # An admin listing tokens sees the forged rows for what they are.
    st, out = await skm.mgmt("GET", "/tokens?all=true")
    status = {t["tokenId"]: t["status"] for t in out["body"]["tokens"]}
    assert status["deadbeefdeadbeef"] == status["feedfacefeedface"] == "INVALID", status
    assert sorted(status.values()) == ["ACTIVE", "INVALID", "INVALID"], status
    # The tokens the server issued still work, and revoking a forged row (it allows nothing) is allowed.
    st, me = await skm.mgmt("GET", "/whoami")
    assert st == 200 and me["body"]["name"] == "admin"
    st, _ = await skm.mgmt("DELETE", "/tokens/deadbeefdeadbeef")
    assert st == 200


async def test_a_role_raised_or_granted_in_the_database_grants_nothing(skm):
    db = skm.rt.storage
    await skm.mgmt("POST", "/operators", json={"name": "val", "role": "viewer"})
    viewer = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("val"))
    val_id = await db.fetchval("SELECT id FROM operators WHERE name = 'val'")
    create = ("POST", "/operators", {"name": "by-val", "role": "admin"})
    st, out = await skm.mgmt(*create[:2], json=create[2], token=viewer)
    assert st == 403, out
    # Raise the grant in place: it now fails its seal, so val holds no role at all.
    await db.execute("UPDATE operator_roles SET role = 'admin' WHERE operator_id = ?", val_id)
    st, out = await skm.mgmt(*create[:2], json=create[2], token=viewer)
    assert st == 403, out
    st, me = await skm.mgmt("GET", "/whoami", token=viewer)
    assert st == 200 and me["body"]["roles"] == [], me
    # A new grant row, with a real grant's seal copied onto it: still nothing.
    admin_seal = await db.fetchval("SELECT seal FROM operator_roles WHERE operator_id = "
                                   "(SELECT id FROM operators WHERE name = 'admin')")
    await db.execute("INSERT INTO operator_roles (operator_id, role, project_id, granted_at, seal) "
                     "VALUES (?, 'admin', NULL, '2026-01-01T00:00:00.000000Z', ?)", val_id, admin_seal)
    st, out = await skm.mgmt(*create[:2], json=create[2], token=viewer)
    assert st == 403, out
    assert await db.fetchval("SELECT COUNT(*) AS n FROM operators WHERE name = 'by-val'") == 0
    # What an admin is shown is what is in force: no role for val.
    st, out = await skm.mgmt("GET", "/operators/val")
    assert st == 200 and out["body"]["roles"] == [], out
    assert await _seal_failures(skm, "operator_roles") >= 2
    # An admin's grant through the server is sealed and works.
    st, out = await skm.mgmt("POST", "/operators/val/roles", json={"role": "admin"})
    assert st == 200, out
    st, out = await skm.mgmt(*create[:2], json=create[2], token=viewer)
    assert st == 201, out


async def test_an_admin_forged_in_the_database_does_not_let_the_last_real_admin_go(skm):
    db = skm.rt.storage
    await skm.mgmt("POST", "/operators", json={"name": "val", "role": "viewer"})
    await db.execute("UPDATE operator_roles SET role = 'admin' WHERE operator_id = "
                     "(SELECT id FROM operators WHERE name = 'val')")
    # Were val's grant counted, the only real admin could be disabled (here by a change with no acting
    # operator, as an applied change request or the server itself makes) and leave nobody to administer.
    with pytest.raises(Conflict, match="last enabled global admin"):
        await skm.rt.operators.update("admin", disabled=True)
    st, me = await skm.mgmt("GET", "/whoami")
    assert st == 200 and [r["role"] for r in me["body"]["roles"]] == ["admin"], me


async def test_a_password_hash_or_enable_bit_set_in_the_database_lets_nobody_in(skm):
    db = skm.rt.storage
    await skm.mgmt("POST", "/operators", json={"name": "ops1", "role": "admin", "password": PW})
    st, _ = await _login(skm, "ops1", PW)
    assert st == 200
    # A disabled operator switched back on in the database stays out.
    st, out = await skm.mgmt("POST", "/tokens", json={"operator": "ops1"})
    token = out["body"]["token"]
    st, _ = await skm.mgmt("PATCH", "/operators/ops1", json={"disabled": True})
    assert st == 200
    await db.execute("UPDATE operators SET disabled = 0 WHERE name = 'ops1'")
    st, _ = await skm.mgmt("GET", "/whoami", token=token)
    assert st == 401
    st, _ = await _login(skm, "ops1", PW)
    assert st == 401
    # The server refuses to re-seal an edited row (that would launder the edit) and says what to do.
    st, out = await skm.mgmt("PATCH", "/operators/ops1", json={"disabled": False})
    assert st == 500 and "changed outside the key server" in out["header"]["resultDetail"], out
    assert await db.fetchval("SELECT disabled FROM operators WHERE name = 'ops1'") == 0
    # Deleting it only narrows, so it is allowed; the name can be made again, sealed.
    st, out = await skm.mgmt("DELETE", "/operators/ops1")
    assert st == 200, out
    st, out = await skm.mgmt("POST", "/operators", json={"name": "ops1", "role": "viewer", "password": PW})
    assert st == 201, out
    st, _ = await _login(skm, "ops1", PW)
    assert st == 200
    # The admin's password hash replaced by one of the attacker's, hashed exactly as the server hashes:
    # the same answer as a wrong password, and the admin row now allows nothing at all (fail closed).
    await db.execute("UPDATE operators SET password_hash = ? WHERE name = 'admin'",
                     PasswordHasher().hash("the attacker's password"))
    st, out = await _login(skm, "admin", "the attacker's password")
    assert st == 401 and out["header"]["resultDetail"] == "wrong operator name or password", out
    st, _ = await skm.mgmt("GET", "/whoami")
    assert st == 401
    assert await _seal_failures(skm, "operators") >= 3


async def test_an_access_key_or_bearer_token_stretched_in_the_database_is_refused(skm):
    db = skm.rt.storage
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    path = f"/secrets/{kid}"
    key_id, secret = await access_key(skm, expiresInDays=1)
    headers = v12_headers(key_id, secret)
    assert assert_ok(*await skm.client("GET", path, version="v1.2", headers=headers)) == {"secret": "v"}
    token = await bearer(skm, key_id, secret)
    assert assert_ok(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": token})) == {
        "secret": "v"}
    # Never expire, and a token living for years: both rows now fail their seals.
    await db.execute("UPDATE user_access_keys SET expires_at = NULL WHERE id = ?", key_id)
    await db.execute("UPDATE oauth_tokens SET expires_at = '2099-01-01T00:00:00.000000Z'")
    skm.rt.callers.cache.clear()           # changed behind the server's back: no event reached it
    st, out = await skm.client("GET", path, version="v1.2", headers=headers)
    assert st == 401 and out["header"]["resultDetail"] == "the user access key is not valid", out
    st, out = await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": token})
    assert st == 401, out
    # A bearer token row minted for the (intact) access key of another: refused too.
    other_id, other_secret = await access_key(skm)
    mine = "minted-token-secret"
    await db.execute("INSERT INTO oauth_tokens (id, access_key_id, token_hash, expires_at, created_at) VALUES "
                     "('0123456789abcdef', ?, ?, '2099-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')",
                     other_id, hashlib.sha256(mine.encode()).hexdigest())
    st, out = await skm.client("GET", path, version="v1.3",
                               headers={"X-NHN-Authorization": f"skmat_0123456789abcdef_{mine}"})
    assert st == 401, out
    assert await _seal_failures(skm, "oauth_tokens") >= 2
    assert assert_ok(*await skm.client("GET", path, version="v1.2", headers=v12_headers(other_id, other_secret)))


async def test_the_first_start_seals_what_init_wrote_and_says_so_in_the_audit(skm):
    db = skm.rt.storage
    # `skm server init` wrote the admin, its grant and its token unsealed; the start sealed them.
    for table in ("operators", "operator_roles", "operator_tokens"):
        assert await db.fetchval(f"SELECT COUNT(*) AS n FROM {table} WHERE seal IS NULL") == 0, table
    st, out = await skm.mgmt("GET", "/audit?action=access.sealed")
    records = out["body"]["records"]
    assert [r["actor"] for r in records] == ["system"], records
    assert records[0]["detail"]["rows"] == {"operators": 1, "operator_roles": 1, "operator_tokens": 1,
                                            "user_access_keys": 0, "oauth_tokens": 0, "keystores": 0,
                                            "auth_ipv4s": 0, "auth_macs": 0, "auth_certificates": 0, "keys": 0,
                                            "key_versions": 0, "change_requests": 0, "change_approvals": 0}
    # A second process (a worker or replica starting later) finds the key and seals nothing again.
    again = AccessSeal(db, skm.rt.barrier)
    assert await again.key() == await skm.rt.access_seal.key()
    st, out = await skm.mgmt("GET", "/audit?action=access.sealed")
    assert len(out["body"]["records"]) == 1


async def test_a_seal_key_removed_from_the_database_is_tampering_not_a_fresh_start(skm):
    db = skm.rt.storage
    await db.execute("UPDATE access_seal SET key_sealed = NULL WHERE id = 1")
    # A forged token row inserted at the same time must not be sealed by a "first start".
    admin_id = await db.fetchval("SELECT id FROM operators WHERE name = 'admin'")
    await db.execute("INSERT INTO operator_tokens (id, operator_id, secret_hash, created_at) VALUES "
                     "('deadbeefdeadbeef', ?, ?, '2026-01-01T00:00:00.000000Z')", admin_id,
                     hashlib.sha256(b"mine").hexdigest())
    with pytest.raises(BarrierError, match="restore it from a backup"):
        await AccessSeal(db, skm.rt.barrier).key()          # a restarted server, as it loads the key
    assert await db.fetchval("SELECT seal FROM operator_tokens WHERE id = 'deadbeefdeadbeef'") is None
    assert await db.fetchval("SELECT key_sealed FROM access_seal WHERE id = 1") is None


@contextlib.asynccontextmanager
async def _initialised(tmp_path):
    """`skm server init`'s data dir, whose rows are unsealed as every version before sealing wrote them,
    and its store open."""
    cfg = make_config(tmp_path / "data")
    result = await init_server(cfg)
    storage = open_storage(cfg.storage_url())
    await storage.open()
    try:
        yield cfg, result, storage
    finally:
        await storage.close()


async def test_credentials_made_before_sealing_keep_working_after_the_upgrade(tmp_path):
    # An access key is added the way earlier versions stored one (its digest only); the first start seals
    # it with the rows `init` wrote.
    async with _initialised(tmp_path) as (cfg, result, storage):
        admin_id = await storage.fetchval("SELECT id FROM operators WHERE name = 'admin'")
        await storage.execute(
            "INSERT INTO user_access_keys (id, operator_id, project_id, secret_hash, description, expires_at, "
            "created_by, created_at) VALUES ('OLDKEY0000000000000A', ?, NULL, ?, 'made before sealing', NULL, "
            "'admin', '2026-01-01T00:00:00.000000Z')", admin_id, hashlib.sha256(b"old secret").hexdigest())
    skm = Harness(await KeyServer(cfg).start(), result, tmp_path)
    try:
        store = await skm.keystore("apps")
        kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
        headers = v12_headers("OLDKEY0000000000000A", "old secret")
        assert assert_ok(*await skm.client("GET", f"/secrets/{kid}", version="v1.2", headers=headers)) == {
            "secret": "v"}
        token = await bearer(skm, "OLDKEY0000000000000A", "old secret")
        assert assert_ok(*await skm.client("GET", f"/secrets/{kid}", version="v1.3",
                                           headers={"X-NHN-Authorization": token})) == {"secret": "v"}
        st, out = await skm.mgmt("GET", "/audit?action=access.sealed")
        assert out["body"]["records"][0]["detail"]["rows"]["user_access_keys"] == 1
    finally:
        await skm.close()


async def test_the_first_check_after_an_upgrade_sees_the_rows_it_sealed(tmp_path):
    # A key server whose system key arrives late serves requests as soon as it is unsealed: the first
    # credential check can be the one that seals. It must read its row after sealing, not before.
    from server.access.operators import Operators
    from server.backup.keys import unsealed_barrier
    async with _initialised(tmp_path) as (cfg, result, storage), unsealed_barrier(cfg) as barrier:
        ops = Operators(storage, seal=AccessSeal(storage, barrier))
        op = await ops.authenticate_token(result.token)
        assert op.name == "admin" and op.role == "admin"
