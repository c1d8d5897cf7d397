"""An empty secret value is refused (400, nothing stored) on every API a secret value enters by."""
from __future__ import annotations

from tests.access.helpers import access_key, token_call, v12_headers
from tests.api.test_client_api import assert_err, assert_ok


async def _versions(skm, key_id: str) -> int:
    return int(await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM key_versions WHERE key_id = ?", key_id))


async def _key_count(skm) -> int:
    return int(await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM keys"))


async def test_every_api_refuses_an_empty_secret(skm):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SECRET", "db", secretValue="v1"))["keyId"]
    before = await _key_count(skm)

    # Management API: create and rotate.
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "empty", "secretValue": ""})
    assert st == 400 and "secretValue" in out["header"]["resultDetail"], out
    st, out = await skm.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": ""})
    assert st == 400 and "secretValue" in out["header"]["resultDetail"], out

    # Client API v1.2 (access key) and v1.3 (bearer token): create, and PUT /secrets/{keyid}.
    key_id, secret = await access_key(skm)
    st, tok = await token_call(skm, "/oauth2/token/create", key_id, secret, {"grant_type": "client_credentials"})
    assert st == 200, tok
    for version, headers in (("v1.2", v12_headers(key_id, secret)),
                             ("v1.3", {"X-NHN-Authorization": f"Bearer {tok['access_token']}"})):
        st, out = await skm.client("POST", "/keys/secrets/create", version=version, headers=headers,
                                   json={"keyStoreName": "apps", "name": f"empty-{version}", "secretValue": ""})
        assert_err(st, out, 400, "Invalid Request")
        assert "secretValue" in out["header"]["resultDetail"]
        st, out = await skm.client("PUT", f"/secrets/{kid}", version=version, headers=headers,
                                   json={"secretValue": ""})
        assert_err(st, out, 400, "Invalid Request")
        # The same calls with a value work: the refusal is about emptiness only.
        st, out = await skm.client("PUT", f"/secrets/{kid}", version=version, headers=headers,
                                   json={"secretValue": f"new-{version}"})
        assert_ok(st, out)

    # Nothing empty was stored: no new key, and the secret still has its last real value.
    assert await _key_count(skm) == before
    assert await _versions(skm, kid) == 3
    assert await skm.rt.keys.secret_value(await skm.rt.keys.key(kid)) == "new-v1.3"


async def test_the_key_service_refuses_an_empty_secret_whatever_the_caller(skm):
    # The rule lives in the domain type: the console, an approved change request, anything that calls it.
    import pytest
    from server.errors import InvalidRequest
    store = await skm.keystore("apps")
    ks = await skm.rt.keys.keystore(store["keyStoreId"])
    kid = (await skm.key(store, "SECRET", "db", secretValue="v1"))["keyId"]
    key = await skm.rt.keys.key(kid)
    with pytest.raises(InvalidRequest, match="must not be empty"):
        await skm.rt.keys.create_key(ks, "SECRET", "e", actor="t", secret_value="")
    with pytest.raises(InvalidRequest, match="must not be empty"):
        await skm.rt.keys.update_secret(key, "", actor="t")
    with pytest.raises(InvalidRequest, match="must not be empty"):
        await skm.rt.keys.rotate(key, actor="t", new_secret="")
    assert await _versions(skm, kid) == 1
    assert await _key_count(skm) == 1
