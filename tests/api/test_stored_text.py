"""Names, descriptions and comments refuse control and bidi characters on both APIs (issue 14)."""
from __future__ import annotations

import pytest

from server.errors import InvalidRequest
from server.text import check, visible
from tests.access.helpers import access_key, v12_headers
from tests.api.test_client_api import assert_err, assert_ok

BAD = ["nul\x00x", "two\nlines", "tab\there", "cr\rx", "\x1b[2Jwiped", "del\x7fx", "c1\x85x", "csi\x9b31m",
       "gpj.\u202eexe", "iso\u2066late\u2069", "mark\u200fx", "alm\u061cx", "line\u2028sep", "para\u2029sep"]
GOOD = ["café 東京", "key 🔑", "family 👩\u200d👩\u200d👧", "plain-name_1.0", "Ünïcödé ÀÉÎ"]


def test_check_refuses_every_unsafe_character_and_keeps_ordinary_text():
    for bad in BAD:
        with pytest.raises(InvalidRequest) as e:
            check(bad, "name")
        assert "U+" in str(e.value.detail) and "name" in e.value.detail
    for good in GOOD:
        assert check(good, "name") == good and visible(good) == good
    assert visible("a\x1b[31mb\u202ec\nd\x00") == "a\\x1b[31mb\\u202ec\\nd\\x00"


async def snapshot(skm) -> list:
    db = skm.rt.storage
    return [await db.fetchall(f"SELECT * FROM {t} ORDER BY 1")
            for t in ("projects", "keystores", "keys", "auth_ipv4s", "auth_macs", "auth_certificates",
                      "user_access_keys", "operator_tokens", "change_requests")]


@pytest.mark.parametrize("bad", ["\x1b[31mred", "two\nlines", "gpj.\u202eexe", "nul\x00", "c1\x9b"])
async def test_management_api_refuses_unsafe_names_and_descriptions(skm, bad):
    store = await skm.keystore("ok-store")
    key = await skm.key(store, "SECRET", "ok-key", secretValue="v")
    ks = store["keyStoreId"]
    before = await snapshot(skm)
    calls = [
        ("POST", "/keystores", {"name": bad, "ip4AuthUse": "Y"}),
        ("POST", "/keystores", {"name": "fine", "description": bad, "ip4AuthUse": "Y"}),
        ("PATCH", f"/keystores/{ks}", {"name": bad}),
        ("PATCH", f"/keystores/{ks}", {"description": bad}),
        ("POST", f"/keystores/{ks}/keys", {"keyType": "SECRET", "name": bad, "secretValue": "v"}),
        ("POST", f"/keystores/{ks}/keys", {"keyType": "SECRET", "name": "n", "description": bad, "secretValue": "v"}),
        ("PATCH", f"/keys/{key['keyId']}", {"description": bad}),
        ("POST", f"/keystores/{ks}/auths/ipv4s", {"value": "10.0.0.1", "description": bad}),
        ("POST", f"/keystores/{ks}/auths/macs", {"value": "02:00:00:00:00:01", "description": bad}),
        ("POST", f"/keystores/{ks}/certificates", {"name": "c1", "password": "pass-word-1", "description": bad}),
        ("POST", f"/keystores/{ks}/certificates", {"name": bad, "password": "pass-word-1"}),
        ("POST", "/access-keys", {"description": bad}),
        ("POST", "/tokens", {"description": bad}),
        ("POST", "/operators", {"name": bad, "role": "viewer"}),
    ]
    for method, path, body in calls:
        st, out = await skm.mgmt(method, path, json=body)
        assert_err(st, out, 400, "Invalid Request")
    st, out = await skm.mgmt("POST", "/login", json={"name": "admin", "password": "x", "description": bad})
    assert_err(st, out, 400, "Invalid Request")
    assert await snapshot(skm) == before


@pytest.mark.parametrize("bad", ["\x1b]0;pwned\x07", "gpj.\u202eexe", "x\u2066y"])
async def test_client_api_refuses_unsafe_names_and_descriptions(skm, bad):
    await skm.keystore("ok-store")
    kid, secret = await access_key(skm)
    h = v12_headers(kid, secret)
    before = await snapshot(skm)
    calls = [
        ("/keys/secrets/create", {"keyStoreName": "ok-store", "name": bad, "secretValue": "v"}),
        ("/keys/secrets/create", {"keyStoreName": "ok-store", "name": "n", "description": bad, "secretValue": "v"}),
        ("/keys/symmetric-keys/create", {"keyStoreName": "ok-store", "name": bad}),
        ("/keys/asymmetric-keys/create", {"keyStoreName": "ok-store", "name": "n", "description": bad}),
        ("/auths/ipv4s", {"keyStoreName": "ok-store", "value": "10.0.0.1", "description": bad}),
        ("/auths/certificates", {"keyStoreName": "ok-store", "name": "c", "password": "pass-word-1", "lifeTime": 9,
                                 "description": bad}),
        ("/auths/certificates", {"keyStoreName": "ok-store", "name": bad, "password": "pass-word-1", "lifeTime": 9}),
    ]
    for path, body in calls:
        st, out = await skm.client("POST", path, version="v1.2", json=body, headers=h)
        assert_err(st, out, 400, "Invalid Request")
    assert await snapshot(skm) == before


async def test_ordinary_unicode_names_are_kept(skm):
    for i, good in enumerate(GOOD):
        store = await skm.keystore(good, description=good)
        key = await skm.key(store, "SECRET", good, description=good, secretValue="v")
        assert (store["name"], key["name"], key["description"]) == (good, good, good), i


async def test_a_change_held_for_approval_is_checked_before_it_is_held(skm):
    await skm.rt.operators.create("appr", "approver")
    store = await skm.keystore("gated", approvalRequired=True, register_loopback=False)
    before = await snapshot(skm)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SYMMETRIC_KEY", "name": "x\u202ey"})
    assert_err(st, out, 400, "Invalid Request")
    # Straight through the gate too (the console's path), not only the request models.
    ks = await skm.rt.keys.keystore(store["keyStoreId"])
    with pytest.raises(InvalidRequest):
        await skm.rt.changes.submit("admin", ks, "key.create", {"keystore_id": ks.id, "key_type": "SECRET",
                                                                "name": "ok", "description": "a\nb",
                                                                "secret_value": "v"})
    with pytest.raises(InvalidRequest):
        await skm.rt.keys.create_keystore(1, "evil\x1b[2J", ip4_auth=True, actor="admin")
    assert await snapshot(skm) == before
