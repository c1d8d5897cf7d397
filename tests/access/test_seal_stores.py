"""Whoever can write the database, without the system key, cannot change which clients reach which key
(server/access/seal.py): not by adding an address, switching a check or the approval rule, bringing an
entry back, moving a key into a store they pass or retyping a key as a readable secret. Each test plays
that attacker with plain SQL on the server's own database, then uses the server as a client would.

Caches would hide an edit for up to their max age (5 s); each test drops them as a restart would."""
from __future__ import annotations

import os

import pytest

from server.access.seal import AccessSeal
from server.app import KeyServer
from server.barrier.barrier import sealed_aad
from server.errors import BarrierError
from server.events import Event
from server.keys.model import KeyStatus
from tests.access.test_seal import _initialised
from tests.api.test_client_api import assert_err, assert_ok
from tests.support.server import Harness

CHANGED = "changed outside the key server"
NOW = "2026-01-01T00:00:00.000000Z"


async def _forget(skm, keystore_id: int, key_id: str | None = None) -> None:
    """Drop the cached store, its entries and the key, as a restart (or the caches' max age) would."""
    await skm.rt.keys.ctx.publish(Event(keystore_id, "keystore_updated", key_id))


async def _failures(skm, table: str) -> float:
    return await skm.metric("skm_access_seal_failures_total", table=table)


def _refused_as_edited(st: int, out: dict) -> None:
    assert st == 500 and CHANGED in out["header"]["resultDetail"], (st, out)
    assert out["body"] is None


async def _entries(skm, ks_id: int) -> dict[str, str]:
    st, out = await skm.mgmt("GET", f"/keystores/{ks_id}/auths/ipv4s")
    assert st == 200, out
    return {e["value"]: e["status"] for e in out["body"]["entries"]}


async def test_an_address_written_into_a_store_admits_nobody(skm):
    db = skm.rt.storage
    store = await skm.keystore("locked", register_loopback=False)
    sid = store["keyStoreId"]
    kid = (await skm.key(store, "SECRET", "db", secretValue="s3cret"))["keyId"]
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")
    await skm.mgmt("POST", f"/keystores/{sid}/auths/ipv4s", json={"value": "10.9.8.7"})
    real_seal = await db.fetchval("SELECT seal FROM auth_ipv4s WHERE keystore_id = ?", sid)
    # The loopback address inserted without a seal, and a whole-internet block with a real entry's seal.
    for value, seal in (("127.0.0.1", None), ("0.0.0.0/0", real_seal)):
        await db.execute("INSERT INTO auth_ipv4s (keystore_id, value, created_by, created_at, updated_by, updated_at, "
                         "seal) VALUES (?, ?, 'admin', ?, 'admin', ?, ?)", sid, value, NOW, NOW, seal)
    await _forget(skm, sid)
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")
    assert await _failures(skm, "auth_ipv4s") >= 2
    # The operator's list shows the forged rows for what they are.
    assert await _entries(skm, sid) == {"10.9.8.7": "ACTIVE", "127.0.0.1": "INVALID", "0.0.0.0/0": "INVALID"}
    # A forged entry is removed the usual way (scheduling only narrows), then the real one is added.
    path = f"/keystores/{sid}/auths/ipv4s"
    for step in ("schedule-deletion", "delete"):
        st, out = await skm.mgmt("POST", f"{path}/{step}", json={"value": "127.0.0.1"})
        assert st == 200, out
    st, out = await skm.mgmt("POST", path, json={"value": "127.0.0.1"})
    assert st == 201 and out["body"]["status"] == "ACTIVE", out
    assert assert_ok(*await skm.client("GET", f"/secrets/{kid}")) == {"secret": "s3cret"}


async def test_an_entry_switched_back_on_or_edited_in_the_database_stays_out(skm):
    db = skm.rt.storage
    store = await skm.keystore("apps")
    sid = store["keyStoreId"]
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    assert_ok(*await skm.client("GET", f"/secrets/{kid}"))
    path = f"/keystores/{sid}/auths/ipv4s"
    st, out = await skm.mgmt("POST", f"{path}/schedule-deletion", json={"value": "127.0.0.1"})
    assert st == 200, out
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")
    await db.execute("UPDATE auth_ipv4s SET status = 'ACTIVE', deletion_at = NULL WHERE keystore_id = ?", sid)
    await _forget(skm, sid)
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")
    assert await _entries(skm, sid) == {"127.0.0.1": "INVALID"}
    # Scheduling it again only narrows, so it is allowed on a failing row, which keeps its old seal: that
    # puts the row back exactly as the server wrote it, and an operator's cancellation then counts.
    st, out = await skm.mgmt("POST", f"{path}/schedule-deletion", json={"value": "127.0.0.1"})
    assert st == 200, out
    assert await _entries(skm, sid) == {"127.0.0.1": "SCHEDULED_DELETION"}
    st, out = await skm.mgmt("POST", f"{path}/cancel-deletion", json={"value": "127.0.0.1"})
    assert st == 200 and out["body"]["status"] == "ACTIVE", out
    assert_ok(*await skm.client("GET", f"/secrets/{kid}"))
    # A scheduled entry whose address was edited: cancelling would seal the edit afresh, so it is refused
    # and changes nothing.
    await skm.mgmt("POST", path, json={"value": "10.1.1.1"})
    await skm.mgmt("POST", f"{path}/schedule-deletion", json={"value": "10.1.1.1"})
    await skm.mgmt("POST", f"{path}/schedule-deletion", json={"value": "127.0.0.1"})
    await db.execute("DELETE FROM auth_ipv4s WHERE keystore_id = ? AND value = '127.0.0.1'", sid)
    await db.execute("UPDATE auth_ipv4s SET value = '127.0.0.1' WHERE keystore_id = ?", sid)
    before = await db.fetchone("SELECT status, seal FROM auth_ipv4s WHERE keystore_id = ?", sid)
    _refused_as_edited(*await skm.mgmt("POST", f"{path}/cancel-deletion", json={"value": "127.0.0.1"}))
    assert await db.fetchone("SELECT status, seal FROM auth_ipv4s WHERE keystore_id = ?", sid) == before
    await _forget(skm, sid)
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")


async def test_a_store_whose_checks_or_approval_rule_were_edited_refuses_every_client_and_change(skm):
    db = skm.rt.storage
    # Loopback is registered, but no MAC is: with AND the client is refused.
    store = await skm.keystore("two-checks", macAuthUse="Y", macVerification="header", authMode="AND")
    sid = store["keyStoreId"]
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    assert_err(*await skm.client("GET", f"/secrets/{kid}"), 403, "MAC Auth Failure")
    # OR instead of AND, in the database: the store now refuses everyone rather than admitting loopback.
    await db.execute("UPDATE keystores SET auth_mode = 'OR' WHERE id = ?", sid)
    await _forget(skm, sid)
    _refused_as_edited(*await skm.client("GET", f"/secrets/{kid}"))
    st, out = await skm.mgmt("GET", f"/keystores/{sid}")
    assert st == 200 and out["body"]["integrity"] == "INVALID" and out["body"]["authMode"] == "OR", out
    # No change is made to it, not even one an operator may make: its approval rule is part of the edit.
    _refused_as_edited(*await skm.mgmt("PATCH", f"/keystores/{sid}", json={"authMode": "AND"}))
    _refused_as_edited(*await skm.mgmt("POST", f"/keystores/{sid}/auths/macs", json={"value": "02:00:00:00:00:01"}))
    _refused_as_edited(*await skm.mgmt("POST", f"/keystores/{sid}/keys",
                                       json={"keyType": "SECRET", "name": "more", "secretValue": "x"}))
    assert await db.fetchval("SELECT COUNT(*) AS n FROM auth_macs WHERE keystore_id = ?", sid) == 0
    assert await db.fetchval("SELECT auth_mode FROM keystores WHERE id = ?", sid) == "OR"
    assert await _failures(skm, "keystores") >= 1
    # Approval switched off in the database: changes are refused, not applied without approvers.
    guarded = await skm.keystore("guarded", approvalRequired=True, register_loopback=False)
    gid = guarded["keyStoreId"]
    await db.execute("UPDATE keystores SET approval_required = 0 WHERE id = ?", gid)
    await _forget(skm, gid)
    _refused_as_edited(*await skm.mgmt("POST", f"/keystores/{gid}/auths/ipv4s", json={"value": "10.0.0.0/8"}))
    assert await _entries(skm, gid) == {}
    # Other stores are not affected.
    other = await skm.keystore("fine")
    okid = (await skm.key(other, "SECRET", "db", secretValue="w"))["keyId"]
    assert assert_ok(*await skm.client("GET", f"/secrets/{okid}")) == {"secret": "w"}


async def test_a_key_moved_retyped_or_made_exportable_in_the_database_serves_nobody(skm):
    db = skm.rt.storage
    mine = await skm.keystore("mine")                                     # the insider passes this one
    prod = await skm.keystore("prod", register_loopback=False)            # and not this one
    secret = (await skm.key(prod, "SECRET", "db-password", secretValue="prod-pw"))["keyId"]
    assert_err(*await skm.client("GET", f"/secrets/{secret}"), 403, "IPv4 Auth Failure")
    # Moved into the store the insider passes.
    await db.execute("UPDATE keys SET keystore_id = ? WHERE id = ?", mine["keyStoreId"], secret)
    await _forget(skm, mine["keyStoreId"], secret)
    _refused_as_edited(*await skm.client("GET", f"/secrets/{secret}"))
    # A symmetric key served as a SECRET would hand out its raw material; exportable would too.
    aes = (await skm.key(mine, "SYMMETRIC_KEY", "aes"))["keyId"]
    assert_err(*await skm.client("GET", f"/symmetric-keys/{aes}/symmetric-key"), 403, "Key Export Not Allowed")
    await db.execute("UPDATE keys SET exportable = 1 WHERE id = ?", aes)
    await _forget(skm, mine["keyStoreId"], aes)
    _refused_as_edited(*await skm.client("GET", f"/symmetric-keys/{aes}/symmetric-key"))
    await db.execute("UPDATE keys SET exportable = 0, key_type = 'SECRET', key_spec = 'SECRET' WHERE id = ?", aes)
    await _forget(skm, mine["keyStoreId"], aes)
    _refused_as_edited(*await skm.client("GET", f"/secrets/{aes}"))
    _refused_as_edited(*await skm.client("POST", f"/symmetric-keys/{aes}/encrypt", json={"plaintext": "aGk="}))
    assert await _failures(skm, "keys") >= 3
    # Operators see them marked; scheduling the deletion narrows and is allowed, cancelling it is not.
    st, out = await skm.mgmt("GET", f"/keys/{aes}")
    assert st == 200 and out["body"]["integrity"] == "INVALID", out
    st, out = await skm.mgmt("POST", f"/keys/{aes}/schedule-deletion")
    assert st == 200 and out["body"]["keyStatus"] == KeyStatus.SCHEDULED_DELETION.value, out
    _refused_as_edited(*await skm.mgmt("POST", f"/keys/{aes}/cancel-deletion"))
    _refused_as_edited(*await skm.mgmt("POST", f"/keys/{secret}/rotate", json={"secretValue": "laundered"}))
    # The insider's own keys keep working.
    own = (await skm.key(mine, "SECRET", "own", secretValue="ok"))["keyId"]
    assert assert_ok(*await skm.client("GET", f"/secrets/{own}")) == {"secret": "ok"}


async def test_a_version_switched_back_on_or_made_primary_again_in_the_database_stays_off(skm):
    db = skm.rt.storage
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SYMMETRIC_KEY", "data"))["keyId"]
    ct0 = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "aGk="}))
    assert (await skm.mgmt("POST", f"/keys/{kid}/rotate"))[0] == 200
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/disable")
    assert st == 200 and out["body"]["status"] == "DISABLED", out
    decrypt = ("POST", f"/symmetric-keys/{kid}/decrypt")
    assert_err(*await skm.client(*decrypt, json={"ciphertext": ct0["ciphertext"]}), 409, "Invalid Key Version Status")
    await db.execute("UPDATE key_versions SET status = 'ACTIVE' WHERE key_id = ? AND version = 0", kid)
    await _forget(skm, store["keyStoreId"], kid)
    _refused_as_edited(*await skm.client(*decrypt, json={"ciphertext": ct0["ciphertext"]}))
    assert await _failures(skm, "key_versions") >= 1
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [(v["keyVersion"], v["status"]) for v in out["body"]["versions"]] == [(0, "INVALID"), (1, "ACTIVE")], out
    # The current version is untouched; disabling version 0 again puts its row back as the server wrote it.
    assert assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "aGk="}))
    st, out = await skm.mgmt("POST", f"/keys/{kid}/versions/0/disable")
    assert st == 200, out
    st, out = await skm.mgmt("GET", f"/keys/{kid}")
    assert [v["status"] for v in out["body"]["versions"]] == ["DISABLED", "ACTIVE"], out
    # Its primary moved back to the disabled version in the database. A rotation (even with the key's
    # row still cached as it was) refuses to seal that, and nothing new is made with the key.
    await db.execute("UPDATE keys SET current_version = 0 WHERE id = ?", kid)
    _refused_as_edited(*await skm.mgmt("POST", f"/keys/{kid}/rotate"))
    assert await db.fetchval("SELECT current_version FROM keys WHERE id = ?", kid) == 0
    await _forget(skm, store["keyStoreId"], kid)
    _refused_as_edited(*await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "aGk="}))


async def test_stores_and_keys_made_before_their_sealing_keep_working_after_the_upgrade(tmp_path):
    """A database whose operator rows an earlier version sealed, and whose stores, entries and keys it
    wrote unsealed: the first start seals those, records it, and clients are served as before."""
    from server.access import seal as seal_module
    from server.backup.keys import unsealed_barrier
    async with _initialised(tmp_path) as (cfg, result, storage), unsealed_barrier(cfg) as barrier:
        older = {t: f for t, f in seal_module.FIELDS.items() if t.startswith(("operator", "user_", "oauth"))}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(seal_module, "FIELDS", older)
            await AccessSeal(storage, barrier).key()
        assert await storage.fetchval("SELECT tables FROM access_seal WHERE id = 1") == ",".join(older)
        project = await storage.fetchval("SELECT id FROM projects")
        now = NOW
        sid = await storage.fetchval(
            "INSERT INTO keystores (project_id, name, ip4_auth, created_by, created_at, updated_by, updated_at) "
            "VALUES (?, 'old', 1, 'admin', ?, 'admin', ?) RETURNING id", project, now, now)
        await storage.execute("INSERT INTO auth_ipv4s (keystore_id, value, created_by, created_at, updated_by, "
                              "updated_at) VALUES (?, '127.0.0.1', 'admin', ?, 'admin', ?)", sid, now, now)
        kid = os.urandom(16).hex()
        await storage.execute("INSERT INTO keys (id, keystore_id, name, key_type, key_spec, status, created_by, "
                              "created_at, updated_by, updated_at) VALUES (?, ?, 'old', 'SECRET', 'SECRET', "
                              "'ACTIVE', 'admin', ?, 'admin', ?)", kid, sid, now, now)
        await storage.execute("INSERT INTO key_versions (key_id, version, material_sealed, created_at) "
                              "VALUES (?, 0, ?, ?)", kid,
                              barrier.seal(b"from before", sealed_aad("key_versions", "material_sealed", kid, 0)), now)
    skm = Harness(await KeyServer(cfg).start(), result, tmp_path)
    try:
        assert assert_ok(*await skm.client("GET", f"/secrets/{kid}")) == {"secret": "from before"}
        st, out = await skm.mgmt("GET", "/audit?action=access.sealed")
        assert [r["detail"]["rows"] for r in out["body"]["records"]] == [
            {"keystores": 1, "auth_ipv4s": 1, "auth_macs": 0, "auth_certificates": 0, "keys": 1,
             "key_versions": 1, "change_requests": 0, "change_approvals": 0}], out
        db = skm.rt.storage
        assert await db.fetchval("SELECT tables FROM access_seal WHERE id = 1") == ",".join(seal_module.FIELDS)
        # Now that it is recorded, taking a table out of the list again (to have edited rows sealed on the
        # next start) is tampering, not an upgrade.
        await db.execute("UPDATE access_seal SET tables = ? WHERE id = 1", ",".join(older))
        await db.execute("UPDATE keys SET seal = NULL, keystore_id = ? WHERE id = ?", sid, kid)
        with pytest.raises(BarrierError, match="restore it from a backup"):
            await AccessSeal(db, skm.rt.barrier).key()          # a restarted server, as it loads the key
        assert await db.fetchval("SELECT seal FROM keys WHERE id = ?", kid) is None
    finally:
        await skm.close()
