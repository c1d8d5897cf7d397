"""A key store's own client checks gate its inventory and its client-API administration (issue 14)."""
from __future__ import annotations

import pytest

from tests.access.helpers import access_key, v12_headers
from tests.api.test_client_api import assert_err, assert_ok
from tests.support.server import start_harness


async def _stores(h) -> tuple[dict, dict, dict]:
    """`open`: loopback registered (this test's client passes); `closed`: only 10.9.9.9 (it does not)."""
    open_ = await h.keystore("open")
    closed = await h.keystore("closed", register_loopback=False)
    st, out = await h.mgmt("POST", f"/keystores/{closed['keyStoreId']}/auths/ipv4s",
                           json={"value": "10.9.9.9", "description": "elsewhere"})
    assert st == 201, out
    key = await h.key(closed, "SECRET", "theirs", secretValue="v")
    return open_, closed, key


def _inventory_paths(closed: dict, key: dict) -> list[str]:
    ks = closed["keyStoreId"]
    return [f"/keystores/{ks}", f"/keystores/{ks}/keys", f"/keystores/{ks}/keys?detail=true",
            f"/keystores/{ks}/keys/{key['keyId']}", f"/keystores/{ks}/ips", f"/keystores/{ks}/ips?value=10.9.9.9",
            f"/keystores/{ks}/macs", f"/keystores/{ks}/certificates"]


async def test_inventory_needs_the_stores_own_checks_by_default(skm):
    open_, closed, key = await _stores(skm)
    for version in ("v1.0", "v1.1"):
        ids = assert_ok(*await skm.client("GET", "/keystores", version=version))["keyStoreIdList"]
        assert ids == [open_["keyStoreId"]]                  # the closed store is not even named
        names = [s["name"] for s in assert_ok(*await skm.client("GET", "/keystores?detail=true",
                                                                version=version))["keyStoreList"]]
        assert names == ["open"]
        for path in _inventory_paths(closed, key):
            st, out = await skm.client("GET", path, version=version)
            assert_err(st, out, 403, "IPv4 Auth Failure")
            assert "10.9.9.9" not in str(out) and "theirs" not in str(out)
    # The store the caller passes stays fully visible.
    ks = open_["keyStoreId"]
    assert assert_ok(*await skm.client("GET", f"/keystores/{ks}"))["name"] == "open"
    assert assert_ok(*await skm.client("GET", f"/keystores/{ks}/ips")) == {"ipv4List": ["127.0.0.1"]}


async def test_compat_setting_restores_appkey_only_inventory(tmp_path):
    h = await start_harness(tmp_path, compat={"inventory_appkey_only": True})
    try:
        assert h.rt.config.compat.inventory_appkey_only is True
        open_, closed, key = await _stores(h)
        ids = assert_ok(*await h.client("GET", "/keystores"))["keyStoreIdList"]
        assert ids == [open_["keyStoreId"], closed["keyStoreId"]]
        for path in _inventory_paths(closed, key):
            assert_ok(*await h.client("GET", path))
        assert assert_ok(*await h.client("GET", f"/keystores/{closed['keyStoreId']}/ips")) == {
            "ipv4List": ["10.9.9.9"]}
        # Only the inventory: using a key still needs the store's checks.
        assert_err(*await h.client("GET", f"/secrets/{key['keyId']}"), 403, "IPv4 Auth Failure")
    finally:
        await h.close()


async def test_compat_setting_from_the_environment():
    from server.config import load
    from server.settings import ServerConfig
    assert load(ServerConfig, None, env={}).compat.inventory_appkey_only is False
    cfg = load(ServerConfig, None, env={"SKM_COMPAT_INVENTORY_APPKEY_ONLY": "true"})
    assert cfg.compat.inventory_appkey_only is True


async def snapshot(skm) -> list:
    db = skm.rt.storage
    return [await db.fetchall(f"SELECT * FROM {t} ORDER BY 1")
            for t in ("keys", "key_versions", "auth_ipv4s", "auth_macs", "auth_certificates", "change_requests")]


@pytest.mark.parametrize("version", ["v1.2", "v1.3"])
async def test_client_api_administration_needs_the_stores_checks_too(skm, version):
    open_, closed, key = await _stores(skm)
    kid, secret = await access_key(skm)
    if version == "v1.2":
        h = v12_headers(kid, secret)
    else:
        from tests.access.helpers import bearer
        h = {"X-NHN-Authorization": f"Bearer {await bearer(skm, kid, secret)}"}
    before = await snapshot(skm)
    writes = [
        ("POST", "/keys/secrets/create", {"keyStoreName": "closed", "name": "n", "secretValue": "x"}),
        ("POST", "/keys/symmetric-keys/create", {"keyStoreName": "closed", "name": "n"}),
        ("POST", "/keys/asymmetric-keys/create", {"keyStoreName": "closed", "name": "n"}),
        ("PUT", f"/keys/{key['keyId']}/delete", None),
        ("DELETE", f"/keys/{key['keyId']}", None),
        ("POST", "/auths/ipv4s", {"keyStoreName": "closed", "value": "127.0.0.1"}),
        ("POST", "/auths/macs", {"keyStoreName": "closed", "value": "02:00:00:00:00:01"}),
        ("PUT", "/auths/ipv4s/delete", {"keyStoreName": "closed", "value": "10.9.9.9"}),
        ("POST", "/auths/ipv4s/delete", {"keyStoreName": "closed", "value": "10.9.9.9"}),
        ("POST", "/auths/certificates", {"keyStoreName": "closed", "name": "c", "password": "pass-word-1",
                                         "lifeTime": 30}),
        ("PUT", "/auths/certificates/delete", {"keyStoreName": "closed", "name": "c"}),
        ("POST", "/auths/certificates/delete", {"keyStoreName": "closed", "name": "c"}),
    ]
    for method, path, body in writes:
        st, out = await skm.client(method, path, version=version, json=body, headers=h)
        assert_err(st, out, 403, "IPv4 Auth Failure")
    assert await snapshot(skm) == before                       # nothing changed
    # The same credential administers the store whose checks it passes.
    out = assert_ok(*await skm.client("POST", "/keys/secrets/create", version=version, headers=h,
                                      json={"keyStoreName": "open", "name": "mine", "secretValue": "x"}))
    assert out["keyStatus"] == "ACTIVE"
    assert_ok(*await skm.client("POST", "/auths/macs", version=version, headers=h,
                                json={"keyStoreName": "open", "value": "02:00:00:00:00:01"}))
    assert_ok(*await skm.client("PUT", f"/keys/{out['keyId']}/delete", version=version, headers=h))
