"""What is on disk: encrypted at rest, survives restarts, refuses a wrong root key."""
from __future__ import annotations

import base64
import datetime as dt
import os

import pytest
from cryptography.hazmat.primitives import serialization

from server.app import KeyServer, run_jobs_once
from server.errors import ConfigError
from tests.api.test_client_api import assert_ok
from tests.support.server import start_harness


def _forms(value: bytes) -> list[bytes]:
    """The ways a value could sit in a file: raw, hex, base64, and as text."""
    out = [value, value.hex().encode(), base64.b64encode(value)]
    return [f for f in out if len(f) >= 8]


async def test_database_holds_no_secret_or_key_material(tmp_path):
    h = await start_harness(tmp_path)
    try:
        store = await h.keystore("grep")
        secrets = ["correct horse battery staple", "postgres://app:S3cr3t!@db/prod", "é✓ unicode secret"]
        ids = [(await h.key(store, "SECRET", f"s{i}", secretValue=v))["keyId"] for i, v in enumerate(secrets)]
        sym = (await h.key(store, "SYMMETRIC_KEY", "aes", exportable=True))["keyId"]
        rsa = (await h.key(store, "ASYMMETRIC_KEY", "rsa", exportable=True))["keyId"]
        ec = (await h.key(store, "ASYMMETRIC_KEY", "ec", keySpec="EC-P256", exportable=True))["keyId"]
        await h.mgmt("POST", f"/keys/{sym}/rotate")
        needles: list[bytes] = [s.encode() for s in secrets]
        for v in (0, 1):
            k = assert_ok(*await h.client("GET", f"/symmetric-keys/{sym}/symmetric-key?keyVersion={v}", version="v1.1"))
            needles.append(bytes(int(b, 16) for b in k["symmetricKey"].split(", ")))
        for kid in (rsa, ec):
            p = assert_ok(*await h.client("GET", f"/asymmetric-keys/{kid}/privateKey"))
            der = base64.b64decode(p["encodedKey"])
            needles.append(der)
            # The private numbers themselves, in case they sat in the file outside a DER.
            key = serialization.load_der_private_key(der, None)
            nums = key.private_numbers()
            secret_int = nums.d if hasattr(nums, "d") else nums.private_value
            needles.append(secret_int.to_bytes((secret_int.bit_length() + 7) // 8, "big"))
        assert ids
    finally:
        await h.close()
    data = tmp_path / "data"
    blobs = {p: p.read_bytes() for p in data.rglob("*") if p.is_file() and "pki" not in p.parts}
    assert any(p.name == "skm.db" for p in blobs)
    for needle in needles:
        for form in _forms(needle):
            for path, blob in blobs.items():
                assert form not in blob, f"{path.name} holds a secret value or key material"


async def test_restart_keeps_everything_and_wrong_root_key_refuses(tmp_path):
    h = await start_harness(tmp_path)
    store = await h.keystore("persist")
    sec = (await h.key(store, "SECRET", "s", secretValue="still here"))["keyId"]
    sym = (await h.key(store, "SYMMETRIC_KEY", "k"))["keyId"]
    enc = assert_ok(*await h.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "before"}))
    cfg = h.server.config
    await h.close()

    again = KeyServer(cfg)
    await again.start()
    try:
        h.server = again
        assert assert_ok(*await h.client("GET", f"/secrets/{sec}"))["secret"] == "still here"
        assert assert_ok(*await h.client("POST", f"/symmetric-keys/{sym}/decrypt",
                                         json={"ciphertext": enc["ciphertext"]}))["plaintext"] == "before"
    finally:
        await h.close()

    root = cfg.root_key_path()
    assert (root.stat().st_mode & 0o777) == 0o600
    root.chmod(0o600)
    root.write_bytes(os.urandom(32))
    with pytest.raises(ConfigError, match="does not unwrap"):
        await KeyServer(cfg).start()
    root.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        await KeyServer(cfg).start()


async def test_tampered_record_fails_loudly(skm):
    store = await skm.keystore("tamper")
    a = (await skm.key(store, "SECRET", "a", secretValue="aaa"))["keyId"]
    b = (await skm.key(store, "SECRET", "b", secretValue="bbb"))["keyId"]
    # Move b's sealed value into a's row: the AAD (record identity) no longer matches.
    db = skm.rt.storage
    blob = await db.fetchval("SELECT material_sealed FROM key_versions WHERE key_id = ?", b)
    await db.execute("UPDATE key_versions SET material_sealed = ? WHERE key_id = ?", blob, a)
    st, out = await skm.client("GET", f"/secrets/{a}")
    assert st == 500 and out["header"]["resultMessage"] == "Storage Integrity Failure"
    assert "bbb" not in str(out) and "aaa" not in str(out)


async def test_auto_rotation_and_purge_jobs(tmp_path):
    h = await start_harness(tmp_path, min_auto_rotation_days=1)
    try:
        store = await h.keystore("jobs")
        st, out = await h.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                               json={"keyType": "SYMMETRIC_KEY", "name": "r", "autoRotationPeriod": 0.5})
        assert st == 400
        rot = await h.key(store, "SYMMETRIC_KEY", "r", autoRotationPeriod=2)
        assert rot["nextAutoRotationDate"] is not None
        gone = await h.key(store, "SECRET", "g", secretValue="x")
        await h.mgmt("POST", f"/keys/{gone['keyId']}/schedule-deletion")
        now = dt.datetime.now(dt.timezone.utc)
        assert await run_jobs_once(h.rt, now + dt.timedelta(days=1)) == {"purged": 0, "rotated": 0, "auth_purged": 0, "holdings_pruned": 0}
        assert await run_jobs_once(h.rt, now + dt.timedelta(days=8)) == {"purged": 1, "rotated": 1, "auth_purged": 0, "holdings_pruned": 0}
        st, out = await h.mgmt("GET", f"/keys/{rot['keyId']}")
        assert out["body"]["currentKeyValueVersion"] == 1 and len(out["body"]["versions"]) == 2
        st, out = await h.mgmt("GET", f"/keys/{gone['keyId']}")
        assert st == 404
    finally:
        await h.close()


async def test_rotation_minimum_is_enforced(skm):
    store = await skm.keystore("minrot")
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SYMMETRIC_KEY", "name": "r", "autoRotationPeriod": 29})
    assert st == 400 and "at least 30" in out["header"]["resultDetail"]
