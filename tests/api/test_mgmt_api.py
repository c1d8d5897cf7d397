"""The management API: key stores and keys, operator token, OpenAPI generated from the routes."""
from __future__ import annotations

import aiohttp


async def test_requires_a_valid_operator_token(skm):
    async with skm._default().get(f"{skm.mgmt_url}/api/v1/keystores") as r:
        assert r.status == 401 and (await r.json())["header"]["resultMessage"] == "Authentication Required"
    for bad in ("skm_nope_nope", "garbage", skm.init.token[:-1] + ("A" if skm.init.token[-1] != "A" else "B")):
        st, out = await skm.mgmt("GET", "/keystores", token=bad)
        assert st == 401, bad


async def test_keystore_rules(skm):
    st, out = await skm.mgmt("POST", "/keystores", json={"name": "none"})
    assert st == 400 and "at least one client check" in out["header"]["resultDetail"]
    store = await skm.keystore("dup", macAuthUse="Y", authMode="OR", macVerification="neighbor")
    assert (store["ip4AuthUse"], store["macAuthUse"], store["authMode"], store["macVerification"]) == \
        ("Y", "Y", "OR", "neighbor")
    st, out = await skm.mgmt("POST", "/keystores", json={"name": "dup", "ip4AuthUse": "Y"})
    assert st == 409
    st, out = await skm.mgmt("POST", "/keystores", json={"name": "x", "ip4AuthUse": "Y", "bogus": 1})
    assert st == 400
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}", json={"ip4AuthUse": "N", "macAuthUse": "N"})
    assert st == 400
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}", json={"authMode": "AND",
                                                                                 "description": "d"})
    assert st == 200 and out["body"]["authMode"] == "AND" and out["body"]["description"] == "d"
    st, out = await skm.mgmt("GET", "/keystores/999")
    assert st == 404


async def test_key_metadata_versions_and_listing(skm):
    store = await skm.keystore("meta")
    key = await skm.key(store, "ASYMMETRIC_KEY", "ec", keySpec="EC-P384", description="signer")
    assert key["keySpec"] == "EC-P384" and key["keyStatus"] == "ACTIVE" and key["exportable"] is False
    st, out = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate")
    st, out = await skm.mgmt("GET", f"/keys/{key['keyId']}")
    assert [v["keyVersion"] for v in out["body"]["versions"]] == [0, 1]
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "ASYMMETRIC_KEY", "name": "ec"})
    assert st == 409
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SYMMETRIC_KEY", "name": "bad", "keySpec": "RSA-2048"})
    assert st == 400
    await skm.key(store, "SECRET", "s", secretValue="v")
    st, out = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys?type=SECRET")
    assert [k["name"] for k in out["body"]["keyList"]] == ["s"]
    # Secret values never appear in management metadata.
    st, out = await skm.mgmt("GET", f"/keystores/{store['keyStoreId']}/keys")
    assert '"v"' not in str(out) and "secretValue" not in str(out)


async def test_key_list_pages_by_number_and_after_a_key(skm):
    store = await skm.keystore("paged")
    other = await skm.keystore("other")
    stranger = await skm.key(other, "SECRET", "elsewhere", secretValue="v")
    ids = [(await skm.key(store, "SECRET", f"k{i:02d}", secretValue="v"))["keyId"] for i in range(23)]
    base = f"/keystores/{store['keyStoreId']}/keys"

    async def page(q: str) -> list[str]:
        st, out = await skm.mgmt("GET", f"{base}?{q}")
        assert st == 200, out
        return [k["keyId"] for k in out["body"]["keyList"]]
    # Page numbers and the keyset cursor walk the same creation order, without gaps or repeats.
    by_number = [k for n in (1, 2, 3) for k in await page(f"page={n}&pageSize=10")]
    walked, after = [], None
    while True:
        got = await page("pageSize=10" + (f"&after={after}" if after else ""))
        if not got:
            break
        walked += got
        after = got[-1]
    assert by_number == walked == ids
    assert await page("page=4&pageSize=10") == []
    assert await page(f"type=SECRET&pageSize=5&after={ids[20]}") == ids[21:]
    # A cursor from another store, or not a key id, is a clear 400, not an empty page.
    for bad in (stranger["keyId"], "0" * 32, "not-a-key"):
        st, out = await skm.mgmt("GET", f"{base}?after={bad}")
        assert st == 400 and out["header"]["isSuccessful"] is False, (bad, out)


async def test_secret_rotation_needs_a_new_value(skm):
    store = await skm.keystore("rot")
    key = await skm.key(store, "SECRET", "s", secretValue="one")
    st, out = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate")
    assert st == 400
    st, out = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "two"})
    assert st == 200 and out["body"]["currentKeyValueVersion"] == 1
    st, out = await skm.client("GET", f"/secrets/{key['keyId']}")
    assert out["body"]["secret"] == "two"


async def test_openapi_lists_every_route(skm):
    async with skm._default().get(f"{skm.mgmt_url}/api/v1/openapi.json") as r:
        doc = await r.json()
    paths = doc["paths"]
    assert "/api/v1/keystores" in paths and "post" in paths["/api/v1/keystores"]
    assert "/api/v1/keys/{key_id}/rotate" in paths
    body = paths["/api/v1/keystores"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/KeyStoreCreate") and "KeyStoreCreate" in doc["components"]["schemas"]
    # Every management route of the application is in the document (they come from one table).
    from server.api.routing import path_params
    from server.app import mgmt_routes
    for r in mgmt_routes().routes:
        path, _ = path_params(r.path)
        assert r.method.lower() in paths[path], path
    async with skm._default().get(f"{skm.mgmt_url}/api/v1/client-openapi.json") as r:
        client = await r.json()
    assert "/keymanager/{version}/appkey/{appkey}/secrets/{keyid}" in client["paths"]


async def test_health_and_metrics(skm):
    for base in (skm.data_url, skm.mgmt_url):
        async with skm._default().get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.json()) == {"status": "ok", "sealed": False}
    await skm.client("GET", "/confirm")
    async with skm._default().get(f"{skm.data_url}/metrics") as r:
        text = await r.text()
    assert "skm_http_requests_total" in text and 'plane="data"' in text


async def test_tls_listeners_refuse_old_protocols(skm):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        for base in (skm.data_url, skm.mgmt_url):
            try:
                async with s.get(f"{base}/healthz") as r:
                    raise AssertionError(f"TLS <= 1.1 accepted: {r.status}")
            except aiohttp.ClientConnectionError:
                pass
