"""The app SDK (sidecar/client.py), sync and async, against a real sidecar and key server."""
from __future__ import annotations

import asyncio

import pytest

from sidecar.client import AsyncSidecarClient, SidecarClient, SidecarError


@pytest.fixture
async def keys(skm, store):
    return {"secret": (await skm.key(store, "SECRET", "db", secretValue="pw"))["keyId"],
            "aes": (await skm.key(store, "SYMMETRIC_KEY", "kek"))["keyId"],
            "rsa": (await skm.key(store, "ASYMMETRIC_KEY", "signer"))["keyId"]}


async def test_async_client_every_operation_and_envelope(make_sidecar, keys):
    sc = await make_sidecar()
    async with AsyncSidecarClient(sc.config.listen.socket, envelope_key_id=keys["aes"]) as c:
        assert await c.get_secret(keys["secret"]) == "pw"
        ct = await c.encrypt(keys["aes"], "hello")
        assert await c.decrypt(keys["aes"], ct) == "hello"
        sig = await c.sign(keys["rsa"], "doc")
        assert await c.verify(keys["rsa"], "doc", sig) is True
        assert await c.verify(keys["rsa"], "tampered", sig) is False

        data = b"\x00binary file\xff" * 1000
        blob = await c.envelope_encrypt(data)
        blob2 = await c.envelope_encrypt(data)
        assert data not in blob and blob[:4] == b"SKE1" and blob != blob2     # a fresh data key each time
        assert await c.envelope_decrypt(blob) == data
        bad = bytearray(blob)
        bad[-1] ^= 1
        with pytest.raises(SidecarError) as e:
            await c.envelope_decrypt(bytes(bad))
        assert e.value.result_message == "Invalid User Data"

        with pytest.raises(SidecarError) as e:
            await c.get_secret("0" * 32)
        assert e.value.result_message == "Invalid Key Id" and e.value.status == 404
        with pytest.raises(SidecarError) as e:
            await c.encrypt(keys["secret"], "x")                  # wrong key type
        assert e.value.result_message == "Invalid Key Type"
    # Only the secret value is cached: never ciphertexts, plaintexts, signatures or data keys.
    assert [e.key_id for e in sc.cache._entries.values()] == [keys["secret"]]


async def test_sync_client_in_a_thread(make_sidecar, keys):
    sc = await make_sidecar()

    def app() -> tuple[str, bytes]:
        c = SidecarClient(sc.config.listen.socket)
        blob = c.envelope_encrypt(b"payload", key_id=keys["aes"])
        return c.get_secret(keys["secret"]), c.envelope_decrypt(blob)

    assert await asyncio.to_thread(app) == ("pw", b"payload")
    with pytest.raises(SidecarError) as e:
        await asyncio.to_thread(SidecarClient(sc.config.listen.socket).decrypt, keys["aes"], "AAAA")
    assert e.value.result_message == "Invalid User Data"
