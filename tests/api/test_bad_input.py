"""Each bad input gets its envelope error and a 4xx, and the store does not change."""
from __future__ import annotations

import base64

import pytest

from tests.api.test_client_api import assert_err, assert_ok


async def snapshot(skm) -> list:
    """Everything a request could change."""
    db = skm.rt.storage
    out = []
    for table in ("keystores", "keys", "key_versions", "auth_ipv4s", "auth_macs"):
        out.append(await db.fetchall(f"SELECT * FROM {table} ORDER BY 1"))
    return out


@pytest.fixture
async def keys(skm):
    store = await skm.keystore("bad")
    return {
        "store": store,
        "secret": (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"],
        "sym": (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"],
        "asym": (await skm.key(store, "ASYMMETRIC_KEY", "a"))["keyId"],
    }


async def raw_post(skm, path: str, data: bytes, content_type: str = "application/json"):
    async with skm._default().post(skm.client_path(path), data=data, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json(content_type=None)


async def test_bad_inputs_each_refused_and_nothing_changes(skm, keys):
    sym, asym, sec = keys["sym"], keys["asym"], keys["secret"]
    before = await snapshot(skm)
    cases = [
        # (call, status, resultMessage)
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x" * (32 * 1024 + 1)}),
         400, "Invalid Request"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "é" * (16 * 1024 + 1)}),
         400, "Data Too Large"),
        (skm.client("POST", f"/asymmetric-keys/{asym}/sign", json={"plaintext": "x" * 246}), 400, "Data Too Large"),
        (skm.client("POST", f"/symmetric-keys/{sym}/decrypt", json={"ciphertext": "not base64!"}),
         400, "Invalid User Data"),
        (skm.client("POST", f"/symmetric-keys/{sym}/decrypt", json={"ciphertext": "AAAA"}), 400, "Invalid User Data"),
        (skm.client("POST", f"/asymmetric-keys/{asym}/verify", json={"plaintext": "x", "signature": "%%%"}),
         400, "Invalid User Data"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext": '), 400, "Invalid JSON"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'["plaintext"]'), 400, "Invalid Request"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'\xff\xfe'), 400, "Invalid JSON"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext": "x"}', "text/plain"),
         415, "Unsupported Content Type"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": 5}), 400, "Invalid Request"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={}), 400, "Invalid Request"),
        (skm.client("GET", "/secrets/" + "0" * 32), 404, "Invalid Key Id"),
        (skm.client("GET", "/secrets/not-a-key-id"), 404, "Invalid Key Id"),
        (skm.client("POST", f"/symmetric-keys/{sec}/encrypt", json={"plaintext": "x"}), 400, "Invalid Key Type"),
        (skm.client("GET", f"/secrets/{sym}"), 400, "Invalid Key Type"),
        (skm.client("POST", f"/asymmetric-keys/{sym}/sign", json={"plaintext": "x"}), 400, "Invalid Key Type"),
        (skm.client("GET", f"/asymmetric-keys/{asym}/publicKey?keyVersion=7"), 400, "Invalid Key Version"),
        (skm.client("GET", f"/asymmetric-keys/{asym}/publicKey?keyVersion=-1"), 400, "Invalid Request"),
        (skm.client("GET", "/no/such/path"), 404, "URL NOT FOUND"),
        (skm.client("DELETE", f"/secrets/{sec}"), 405, "Method Not Allowed"),
        (skm.client("GET", f"/secrets/{sec}", version="v9.9"), 404, "URL NOT FOUND"),
        (skm.client("PUT", f"/secrets/{sec}", version="v1.0", json={"secretValue": "y"}), 404, "URL NOT FOUND"),
    ]
    for call, status, message in cases:
        assert_err(*await call, status, message)
    # A body over the listener's limit is refused before it is read whole.
    st, out = await raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext":"' + b"x" * 300_000 + b'"}')
    assert_err(st, out, 413, "Request Too Large")
    assert await snapshot(skm) == before


async def test_scheduled_deletion_blocks_use_until_cancelled(skm, keys):
    sym = keys["sym"]
    st, out = await skm.mgmt("POST", f"/keys/{sym}/schedule-deletion")
    assert st == 200 and out["body"]["keyStatus"] == "SCHEDULED_DELETION" and out["body"]["deletionDatetime"]
    before = await snapshot(skm)
    assert_err(*await skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x"}),
               409, "Invalid Key Status")
    assert await snapshot(skm) == before
    st, out = await skm.mgmt("POST", f"/keys/{sym}/cancel-deletion")
    assert st == 200 and out["body"]["keyStatus"] == "ACTIVE"
    assert_ok(*await skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x"}))


async def test_immediate_delete_only_from_scheduled(skm, keys):
    sec = keys["secret"]
    st, out = await skm.mgmt("DELETE", f"/keys/{sec}")
    assert st == 409 and out["header"]["resultMessage"] == "Invalid Key Status"
    await skm.mgmt("POST", f"/keys/{sec}/schedule-deletion")
    st, out = await skm.mgmt("DELETE", f"/keys/{sec}")
    assert st == 200 and out["body"]["keyId"] == sec
    assert_err(*await skm.client("GET", f"/secrets/{sec}"), 404, "Invalid Key Id")
    assert await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM key_versions WHERE key_id = ?", sec) == 0


async def test_sign_245_bytes_is_the_limit(skm, keys):
    assert_ok(*await skm.client("POST", f"/asymmetric-keys/{keys['asym']}/sign", json={"plaintext": "é" * 122 + "x"}))
    assert_err(*await skm.client("POST", f"/asymmetric-keys/{keys['asym']}/sign", json={"plaintext": "é" * 123}),
               400, "Data Too Large")


async def test_secret_of_exactly_32k(skm, keys):
    value = "s" * (32 * 1024)
    key = await skm.key(keys["store"], "SECRET", "big", secretValue=value)
    assert assert_ok(*await skm.client("GET", f"/secrets/{key['keyId']}"))["secret"] == value
    st, out = await skm.mgmt("POST", f"/keystores/{keys['store']['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "too-big", "secretValue": value + "s"})
    assert st == 400 and out["header"]["isSuccessful"] is False


async def test_decrypt_ciphertext_from_encrypt_base64(skm, keys):
    enc = assert_ok(*await skm.client("POST", f"/symmetric-keys/{keys['sym']}/encrypt", json={"plaintext": ""}))
    assert len(base64.b64decode(enc["ciphertext"])) == 32
    assert assert_ok(*await skm.client("POST", f"/symmetric-keys/{keys['sym']}/decrypt",
                                       json={"ciphertext": enc["ciphertext"]}))["plaintext"] == ""


@pytest.mark.parametrize("value", ["99999999999999999999", "9223372036854775808", "²", "-1", "1e3"])
async def test_number_parameters_out_of_range_are_400_on_every_api(skm, keys, value):
    """A number too big for the database's integer, or a digit `int()` refuses, is a 400 naming the parameter:
    it used to reach SQLite as an overflow and come back a 500 (found by the long fuzz)."""
    before = await snapshot(skm)
    mgmt = [("/approvals", "keyStoreId"), ("/approvals", "limit"), ("/audit", "keyStoreId"), ("/audit", "beforeSeq"),
            ("/usage", "keyStoreId"), (f"/keystores/{keys['store']['keyStoreId']}/keys", "pageSize")]
    for path, name in mgmt:
        st, body = await skm.mgmt("GET", path, params={name: value})
        assert st == 400, (path, name, st, body)
        assert name in body["header"]["resultDetail"], body
    st, body = await skm.mgmt("DELETE", "/operators/admin/roles", params={"projectId": value})
    assert st == 400 and "projectId" in body["header"]["resultDetail"], body
    st, body = await skm.client("GET", f"/asymmetric-keys/{keys['asym']}/publicKey", params={"keyVersion": value}, version="v1.1")
    assert st == 400 and "keyVersion" in body["header"]["resultDetail"], body
    assert await snapshot(skm) == before
