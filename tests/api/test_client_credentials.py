"""v1.2 user access keys and v1.3 bearer tokens on the client API: missing, wrong, expired and
revoked credentials are refused, the right ones pass; v1.0/v1.1 need the appkey only."""
from __future__ import annotations

import asyncio

import pytest

from tests.access.helpers import access_key, bearer, token_call, v12_headers
from tests.api.test_client_api import assert_err, assert_ok

PAST = "2000-01-01T00:00:00.000000Z"


@pytest.fixture
async def kid(skm):
    store = await skm.keystore("apps")
    return (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]


def refused(st, out, detail_part: str = "") -> None:
    assert_err(st, out, 401, "Authentication Required")
    assert detail_part in out["header"].get("resultDetail", "")


async def test_v10_v11_need_only_the_appkey(skm, kid):
    for version in ("v1.0", "v1.1"):
        assert assert_ok(*await skm.client("GET", f"/secrets/{kid}", version=version)) == {"secret": "v"}


async def test_v12_access_keys(skm, kid):
    key_id, secret = await access_key(skm, description="ci")
    path = f"/secrets/{kid}"
    assert assert_ok(*await skm.client("GET", path, version="v1.2", headers=v12_headers(key_id, secret))) == {
        "secret": "v"}
    refused(*await skm.client("GET", path, version="v1.2"), "X-TC-AUTHENTICATION-ID")          # missing
    refused(*await skm.client("GET", path, version="v1.2", headers={"X-TC-AUTHENTICATION-ID": key_id}))
    wrong = await skm.client("GET", path, version="v1.2", headers=v12_headers(key_id, secret[:-1] + "x"))
    unknown = await skm.client("GET", path, version="v1.2", headers=v12_headers("A" * 20, secret))
    refused(*wrong)
    assert wrong == unknown                          # a wrong secret and an unknown id look the same
    # Keys act for the key's operator: the creation user says who.
    st, out = await skm.client("POST", "/keys/secrets/create", version="v1.2", headers=v12_headers(key_id, secret),
                               json={"keyStoreName": "apps", "name": "new", "secretValue": "x"})
    new = assert_ok(st, out)["keyId"]
    one = assert_ok(*await skm.client("GET", f"/keystores/1/keys/{new}"))
    assert one["creationUser"] == f"uak:{key_id}@admin"
    # Expired.
    # Time passing, simulated: the row changed (and sealed again) behind the server's back, with no event.
    await skm.rt.access_seal.update(skm.rt.storage, "user_access_keys", "id = ?", (key_id,), {"expires_at": PAST})
    skm.rt.callers.cache.clear()
    refused(*await skm.client("GET", path, version="v1.2", headers=v12_headers(key_id, secret)), "expired")
    # Deleted (revoked).
    k2, s2 = await access_key(skm)
    assert_ok(*await skm.client("GET", path, version="v1.2", headers=v12_headers(k2, s2)))
    st, out = await skm.mgmt("DELETE", f"/access-keys/{k2}")
    assert st == 200 and "secretAccessKey" not in out["body"]
    refused(*await skm.client("GET", path, version="v1.2", headers=v12_headers(k2, s2)))
    # The secret is stored only as a digest.
    rows = await skm.rt.storage.fetchall("SELECT * FROM user_access_keys")
    assert s2 not in repr(rows) and secret not in repr(rows)


async def test_v12_key_bound_to_another_project(skm, kid):
    other = await skm.rt.keys.create_project("other")
    key_id, secret = await access_key(skm, appkey=other.appkey)
    refused(*await skm.client("GET", f"/secrets/{kid}", version="v1.2", headers=v12_headers(key_id, secret)),
            "another project")
    mine, s = await access_key(skm, appkey=skm.appkey)
    assert_ok(*await skm.client("GET", f"/secrets/{kid}", version="v1.2", headers=v12_headers(mine, s)))


async def test_v13_bearer_tokens(skm, kid):
    key_id, secret = await access_key(skm)
    path = f"/secrets/{kid}"
    st, out = await token_call(skm, "/oauth2/token/create", key_id, secret,
                               {"grant_type": "client_credentials", "expires_in": "600"})
    assert st == 200 and set(out) == {"access_token", "token_type", "expires_in"}   # NHN's shape, no envelope
    assert out["token_type"] == "Bearer" and out["expires_in"] == 600
    token = out["access_token"]
    for value in (f"Bearer {token}", token, f"bearer  {token}"):
        assert_ok(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": value}))
    default = await token_call(skm, "/oauth2/token/create", key_id, secret, {"grant_type": "client_credentials"})
    assert default[1]["expires_in"] == 86400

    refused(*await skm.client("GET", path, version="v1.3"), "X-NHN-Authorization")                 # missing
    refused(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": token[:-2] + "xx"}))
    refused(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": "garbage"}))
    # A v1.2 key pair does not stand in for a v1.3 token, nor a token for a v1.2 pair.
    refused(*await skm.client("GET", path, version="v1.3", headers=v12_headers(key_id, secret)))
    refused(*await skm.client("GET", path, version="v1.2", headers={"X-NHN-Authorization": token}))

    # Token issuance refuses bad client credentials and bad parameters.
    st, out = await token_call(skm, "/oauth2/token/create", key_id, "wrong", {"grant_type": "client_credentials"})
    assert st == 401
    st, out = await token_call(skm, "/oauth2/token/create", None, None, {"grant_type": "client_credentials"})
    assert st == 401
    for form in ({"grant_type": "password"}, {"grant_type": "client_credentials", "expires_in": "59"},
                 {"grant_type": "client_credentials", "expires_in": "86401"},
                 {"grant_type": "client_credentials", "expires_in": "-5"}):
        st, out = await token_call(skm, "/oauth2/token/create", key_id, secret, form)
        assert st == 400 and out["header"]["isSuccessful"] is False, form

    # Expired.
    t2 = await bearer(skm, key_id, secret, 60)
    assert_ok(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": t2}))
    await skm.rt.access_seal.update(skm.rt.storage, "oauth_tokens", "id = ?", (t2.split("_")[1],), {"expires_at": PAST})
    skm.rt.callers.cache.clear()     # changed behind the server's back (no event): time passing, simulated
    refused(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": t2}), "expired")

    # Revoked: only by the key it came from; an unknown token is "revoked" silently (RFC 7009).
    other_id, other_secret = await access_key(skm)
    st, _ = await token_call(skm, "/oauth2/token/revoke", other_id, other_secret, {"token": token})
    assert st == 200
    assert_ok(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": token}))
    st, _ = await token_call(skm, "/oauth2/token/revoke", key_id, secret, {"token": token})
    assert st == 200
    refused(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": f"Bearer {token}"}),
            "revoked")
    st, _ = await token_call(skm, "/oauth2/token/revoke", key_id, secret, {"token": "skmat_nope_nope"})
    assert st == 200

    # Deleting the access key ends every token issued from it.
    t3 = await bearer(skm, key_id, secret)
    assert_ok(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": t3}))
    st, _ = await skm.mgmt("DELETE", f"/access-keys/{key_id}")
    assert st == 200
    refused(*await skm.client("GET", path, version="v1.3", headers={"X-NHN-Authorization": t3}))
    rows = await skm.rt.storage.fetchall("SELECT * FROM oauth_tokens")
    assert t2.split("_")[2] not in repr(rows)          # tokens are stored as digests


async def test_refused_callers_change_nothing(skm, kid):
    from tests.access.test_clientauth import snapshot
    before = await snapshot(skm)
    denied = skm.rt.metrics.registry.get_sample_value("skm_access_denials_total", {"reason": "caller"}) or 0
    refused(*await skm.client("POST", "/keys/secrets/create", version="v1.2",
                              json={"keyStoreName": "apps", "name": "x", "secretValue": "v"},
                              headers=v12_headers("A" * 20, "nope")))
    refused(*await skm.client("PUT", f"/secrets/{kid}", version="v1.3", json={"secretValue": "changed"},
                              headers={"X-NHN-Authorization": "Bearer skmat_0011223344556677_nope"}))
    assert await snapshot(skm) == before
    assert skm.rt.metrics.registry.get_sample_value("skm_access_denials_total", {"reason": "caller"}) == denied + 2


async def test_access_key_management(skm):
    key_id, _ = await access_key(skm, description="mine", expiresInDays=30)
    st, out = await skm.mgmt("GET", "/access-keys")
    listed = out["body"]["accessKeys"]
    assert [k["accessKeyId"] for k in listed] == [key_id]
    assert "secretAccessKey" not in listed[0] and listed[0]["expirationDate"]
    viewer = await skm.rt.operators.create("ann", "viewer")
    vtoken = await skm.rt.operators.issue_token(viewer)
    # A viewer manages their own keys only, and cannot make keys for others.
    st, out = await skm.mgmt("POST", "/access-keys", json={"operator": "admin"}, token=vtoken)
    assert st == 403
    st, out = await skm.mgmt("POST", "/access-keys", json={}, token=vtoken)
    assert st == 201 and out["body"]["operator"] == "ann"
    st, out = await skm.mgmt("GET", "/access-keys", token=vtoken)
    assert [k["operator"] for k in out["body"]["accessKeys"]] == ["ann"]
    st, out = await skm.mgmt("DELETE", f"/access-keys/{key_id}", token=vtoken)
    assert st == 403
    for _ in range(4):
        await access_key(skm)
    st, out = await skm.mgmt("POST", "/access-keys", json={})
    assert st == 409                                   # five per operator, as NHN


async def test_a_viewers_key_uses_keys_but_changes_nothing(skm, kid):
    viewer = await skm.rt.operators.create("val", "viewer")
    vtoken = await skm.rt.operators.issue_token(viewer)
    st, out = await skm.mgmt("POST", "/access-keys", json={}, token=vtoken)
    h = v12_headers(out["body"]["accessKeyId"], out["body"]["secretAccessKey"])
    assert assert_ok(*await skm.client("GET", f"/secrets/{kid}", version="v1.2", headers=h)) == {"secret": "v"}
    from tests.access.test_clientauth import snapshot
    while skm.rt.keys.last_access.pending:          # let the successful read's last-access write land
        await asyncio.sleep(0.01)
    before = await snapshot(skm)
    for method, path, body in (
            ("POST", "/keys/secrets/create", {"keyStoreName": "apps", "name": "x", "secretValue": "v"}),
            ("PUT", f"/secrets/{kid}", {"secretValue": "changed"}),
            ("POST", "/auths/ipv4s", {"keyStoreName": "apps", "value": "10.0.0.1"}),
            ("POST", "/auths/certificates", {"keyStoreName": "apps", "name": "c", "password": "pass-word",
                                             "lifeTime": 1})):
        st, out = await skm.client(method, path, version="v1.2", json=body, headers=h)
        assert_err(st, out, 403, "Forbidden")
    assert await snapshot(skm) == before
