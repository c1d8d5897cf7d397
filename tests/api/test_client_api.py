"""The NHN-compatible client API over real TLS: every operation, every key spec, and bad input."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

ENVELOPE_OK = {"resultCode": 0, "resultMessage": "success", "isSuccessful": True}


def assert_ok(status: int, out: dict) -> dict:
    assert status == 200, out
    assert out["header"] == ENVELOPE_OK
    return out["body"]


def assert_err(status: int, out: dict, code: int, message: str) -> None:
    assert status == code, out
    assert out["header"]["isSuccessful"] is False
    assert out["header"]["resultMessage"] == message
    assert out["body"] is None


@pytest.fixture
async def store(skm):
    return await skm.keystore("apps")


async def test_confirm_reports_caller(skm):
    body = assert_ok(*await skm.client("GET", "/confirm", headers={"X-TOAST-CLIENT-MAC-ADDR": "AA-BB-CC-DD-EE-FF"}))
    assert body["clientIp"] == "127.0.0.1"
    assert body["clientMacHeader"] == "AA-BB-CC-DD-EE-FF"
    assert body["clientSentCertificate"] is False and body["clientSentCerfificate"] is False


async def test_unknown_appkey(skm):
    async with skm._default().get(skm.client_path("/confirm", appkey="NoSuchAppkey0000")) as r:
        assert_err(r.status, await r.json(), 401, "Invalid Appkey")


async def test_secret_round_trip_and_update(skm, store):
    key = await skm.key(store, "SECRET", "db", secretValue="pa55 wörd ✓")
    assert assert_ok(*await skm.client("GET", f"/secrets/{key['keyId']}"))["secret"] == "pa55 wörd ✓"


async def test_symmetric_round_trip_rotation_and_tamper(skm, store):
    key = await skm.key(store, "SYMMETRIC_KEY", "aes")
    kid = key["keyId"]
    enc = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "data"}))
    assert enc["keyVersion"] == 0
    raw = base64.b64decode(enc["ciphertext"])
    assert raw[:4] == b"\0\0\0\0" and len(raw) == 4 + 12 + 4 + 16
    dec = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt", json={"ciphertext": enc["ciphertext"]}))
    assert dec == {"plaintext": "data", "keyVersion": 0}

    st, out = await skm.mgmt("POST", f"/keys/{kid}/rotate")
    assert st == 200 and out["body"]["currentKeyValueVersion"] == 1
    enc1 = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/encrypt", json={"plaintext": "new"}))
    assert enc1["keyVersion"] == 1 and base64.b64decode(enc1["ciphertext"])[:4] == b"\0\0\0\x01"
    # Ciphertext made before the rotation still decrypts, and says which version it used.
    old = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt", json={"ciphertext": enc["ciphertext"]}))
    assert old == {"plaintext": "data", "keyVersion": 0}

    tampered = bytearray(raw)
    tampered[-1] ^= 1
    assert_err(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt",
                                 json={"ciphertext": base64.b64encode(bytes(tampered)).decode()}),
               400, "Invalid User Data")
    # A version header moved to another version does not decrypt either (AAD binds it).
    moved = b"\0\0\0\x01" + raw[4:]
    assert_err(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt",
                                 json={"ciphertext": base64.b64encode(moved).decode()}), 400, "Invalid User Data")
    future = b"\0\0\0\x09" + raw[4:]
    assert_err(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt",
                                 json={"ciphertext": base64.b64encode(future).decode()}), 400, "Invalid Key Version")


async def test_ciphertext_of_another_key_does_not_decrypt(skm, store):
    a = (await skm.key(store, "SYMMETRIC_KEY", "a"))["keyId"]
    b = (await skm.key(store, "SYMMETRIC_KEY", "b"))["keyId"]
    enc = assert_ok(*await skm.client("POST", f"/symmetric-keys/{a}/encrypt", json={"plaintext": "x"}))
    assert_err(*await skm.client("POST", f"/symmetric-keys/{b}/decrypt", json={"ciphertext": enc["ciphertext"]}),
               400, "Invalid User Data")


async def test_local_key_envelope(skm, store):
    kid = (await skm.key(store, "SYMMETRIC_KEY", "kek"))["keyId"]
    lk = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/create-local-key"))
    assert len(base64.b64decode(lk["localKeyPlaintext"])) == 32 and lk["keyVersion"] == 0
    dec = assert_ok(*await skm.client("POST", f"/symmetric-keys/{kid}/decrypt",
                                      json={"ciphertext": lk["localKeyCiphertext"]}))
    assert dec["plaintext"] == lk["localKeyPlaintext"]


@pytest.mark.parametrize("spec", ["RSA-2048", "RSA-3072", "EC-P256", "EC-P384", "ED25519"])
async def test_legacy_sign_verify_every_spec(skm, store, spec):
    kid = (await skm.key(store, "ASYMMETRIC_KEY", f"k-{spec}", keySpec=spec))["keyId"]
    sig = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/sign", json={"plaintext": "hello"}))
    ok = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify",
                                     json={"plaintext": "hello", "signature": sig["signature"]}))
    assert ok == {"result": True, "keyVersion": 0}
    bad = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify",
                                      json={"plaintext": "hellO", "signature": sig["signature"]}))
    assert bad["result"] is False


async def test_rsa_legacy_signature_is_raw_pkcs1_and_survives_rotation(skm, store):
    kid = (await skm.key(store, "ASYMMETRIC_KEY", "rsa"))["keyId"]
    msg = "x" * 245
    sig = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/sign", json={"plaintext": msg}))
    raw = base64.b64decode(sig["signature"])
    assert raw[:4] == b"\0\0\0\0" and len(raw) == 260
    pub = assert_ok(*await skm.client("GET", f"/asymmetric-keys/{kid}/publicKey"))
    key = serialization.load_der_public_key(base64.b64decode(pub["encodedKey"]))
    key.verify(raw[4:], msg.encode(), padding.PKCS1v15(), NoDigestInfo())   # independent check
    await skm.mgmt("POST", f"/keys/{kid}/rotate")
    ok = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify",
                                     json={"plaintext": msg, "signature": sig["signature"]}))
    assert ok == {"result": True, "keyVersion": 0}
    new = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/sign", json={"plaintext": msg}))
    assert new["keyVersion"] == 1
    tampered = bytearray(raw)
    tampered[10] ^= 0xFF
    res = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify", json={
        "plaintext": msg, "signature": base64.b64encode(bytes(tampered)).decode()}))
    assert res["result"] is False


@pytest.mark.parametrize("spec,algorithm", [("RSA-2048", "RSASSA-PSS"), ("RSA-2048", "RSASSA-PKCS1-v1_5"),
                                            ("EC-P256", "ECDSA"), ("ED25519", "ED25519")])
async def test_standard_sign_verify(skm, store, spec, algorithm):
    from tests.access.helpers import access_key, bearer
    kid = (await skm.key(store, "ASYMMETRIC_KEY", f"s-{spec}-{algorithm}", keySpec=spec))["keyId"]
    # v1.3 carries a bearer token made from a user access key.
    token = await bearer(skm, *await access_key(skm))
    v13 = {"X-NHN-Authorization": f"Bearer {token}"}
    data = base64.b64encode(b"\x00binary\xff" * 100).decode()
    sig = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/sign-standard", version="v1.3",
                                      json={"plaintext": data, "algorithm": algorithm}, headers=v13))
    assert sig["algorithm"] == algorithm and sig["keyVersion"] == 0
    if algorithm == "RSASSA-PSS":
        assert (sig["hashAlgorithm"], sig["mgfAlgorithm"], sig["saltLength"]) == ("SHA-256", "MGF1-SHA-256", 32)
    pub = assert_ok(*await skm.client("GET", f"/asymmetric-keys/{kid}/publicKey"))
    key = serialization.load_der_public_key(base64.b64decode(pub["encodedKey"]))
    s, d = base64.b64decode(sig["signature"]), b"\x00binary\xff" * 100
    if algorithm == "RSASSA-PSS":
        key.verify(s, d, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    elif algorithm == "RSASSA-PKCS1-v1_5":
        key.verify(s, d, padding.PKCS1v15(), hashes.SHA256())
    elif algorithm == "ECDSA":
        key.verify(s, d, ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(s, d)
    res = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify-standard", version="v1.3", json={
        "plaintext": data, "signature": sig["signature"], "algorithm": algorithm, "keyVersion": 0}, headers=v13))
    assert res == {"result": True, "keyVersion": 0}
    res = assert_ok(*await skm.client("POST", f"/asymmetric-keys/{kid}/verify-standard", version="v1.3", json={
        "plaintext": base64.b64encode(b"other").decode(), "signature": sig["signature"], "algorithm": algorithm,
        "keyVersion": 0}, headers=v13))
    assert res["result"] is False


async def test_export_refused_unless_exportable(skm, store):
    sym = (await skm.key(store, "SYMMETRIC_KEY", "sealed"))["keyId"]
    asym = (await skm.key(store, "ASYMMETRIC_KEY", "sealed-rsa"))["keyId"]
    assert_err(*await skm.client("GET", f"/symmetric-keys/{sym}/symmetric-key"), 403, "Key Export Not Allowed")
    assert_err(*await skm.client("GET", f"/asymmetric-keys/{asym}/privateKey"), 403, "Key Export Not Allowed")
    # The public key is always available.
    pub = assert_ok(*await skm.client("GET", f"/asymmetric-keys/{asym}/publicKey"))
    assert pub["keyType"] == "PublicKey" and pub["key"].startswith("0x30, 0x82")

    exp = (await skm.key(store, "SYMMETRIC_KEY", "open", exportable=True))["keyId"]
    v0 = assert_ok(*await skm.client("GET", f"/symmetric-keys/{exp}/symmetric-key"))
    assert "keyVersion" not in v0 and len(v0["symmetricKey"].split(", ")) == 32
    v11 = assert_ok(*await skm.client("GET", f"/symmetric-keys/{exp}/symmetric-key?keyVersion=0", version="v1.1"))
    assert v11["keyVersion"] == 0 and v11["symmetricKey"] == v0["symmetricKey"]
    # The exported key really is the key: decrypt a server ciphertext locally.
    enc = assert_ok(*await skm.client("POST", f"/symmetric-keys/{exp}/encrypt", json={"plaintext": "hi"}))
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    raw = base64.b64decode(enc["ciphertext"])
    key = bytes(int(b, 16) for b in v0["symmetricKey"].split(", "))
    assert AESGCM(key).decrypt(raw[4:16], raw[16:], exp.encode() + raw[:4]) == b"hi"

    expa = (await skm.key(store, "ASYMMETRIC_KEY", "open-rsa", exportable=True))["keyId"]
    priv = assert_ok(*await skm.client("GET", f"/asymmetric-keys/{expa}/privateKey"))
    k = serialization.load_der_private_key(base64.b64decode(priv["encodedKey"]), None)
    assert k.key_size == 2048 and priv["keyType"] == "PrivateKey"


async def test_keys_created_and_deleted_through_v12_need_credentials(skm, store):
    # Without caller credentials v1.2 refuses (credentials themselves are tested with access control).
    st, out = await skm.client("POST", "/keys/secrets/create", version="v1.2",
                               json={"keyStoreName": "apps", "name": "x", "secretValue": "v"})
    assert st == 401 and out["header"]["isSuccessful"] is False


async def test_inventory(skm, store):
    kid = (await skm.key(store, "SECRET", "inv", secretValue="v"))["keyId"]
    ids = assert_ok(*await skm.client("GET", "/keystores"))
    assert ids == {"keyStoreIdList": [store["keyStoreId"]]}
    detail = assert_ok(*await skm.client("GET", "/keystores?detail=true"))["keyStoreList"][0]
    assert detail["ip4AuthUse"] == "Y" and detail["name"] == "apps"
    keys = assert_ok(*await skm.client("GET", f"/keystores/{store['keyStoreId']}/keys"))
    assert keys == {"keyIdList": [kid]}
    one = assert_ok(*await skm.client("GET", f"/keystores/{store['keyStoreId']}/keys/{kid}"))
    assert one["keyType"] == "SECRET" and one["currentKeyValueVersion"] == 0 and one["deletionDatetime"] is None
    ips = assert_ok(*await skm.client("GET", f"/keystores/{store['keyStoreId']}/ips"))
    assert ips == {"ipv4List": ["127.0.0.1"]}
    assert_err(*await skm.client("GET", f"/keystores/{store['keyStoreId']}/keys?detail=true&pageSize=5"),
               400, "Invalid Request")
