"""PKCS#11 root key against a SoftHSM2 token the test session initialises itself."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.barrier.barrier import Barrier
from server.barrier.keyring import new_keyring, rewrap
from server.barrier.providers import make_provider
from server.barrier.rootkey import FileRootKey, WrongRootKey, wrap_aad, write_private_file
from server.errors import ConfigError
from tests.support.softhsm import SoftHSM, Token, softhsm  # noqa: F401  (fixture)

pkcs11_mod = pytest.importorskip("server.barrier.pkcs11", reason="pip install python-pkcs11")
PKCS11RootKey = pkcs11_mod.PKCS11RootKey
generate_root_key = pkcs11_mod.generate_root_key


@pytest.fixture
def token(softhsm: SoftHSM, monkeypatch: pytest.MonkeyPatch) -> Token:
    t = softhsm.new_token()
    monkeypatch.setenv("SKM_TEST_PKCS11_PIN", t.pin)
    return t


@pytest.fixture
async def root(softhsm: SoftHSM, token: Token):
    cfg = softhsm.config(token)
    await generate_root_key(cfg)
    provider = PKCS11RootKey.from_config(cfg)
    yield provider
    await provider.close()


async def test_generated_key_is_non_extractable_and_unreadable(softhsm: SoftHSM, token: Token, root):
    await root.open()
    attrs = softhsm.inspect_key(token, "skm-root")
    assert attrs["EXTRACTABLE"] is False
    assert attrs["SENSITIVE"] is True
    assert attrs["TOKEN"] is True
    assert attrs["NEVER_EXTRACTABLE"] is True
    assert attrs["ALWAYS_SENSITIVE"] is True
    assert attrs["VALUE_LEN"] == 32
    assert attrs["read_value"] == "AttributeSensitive"
    assert attrs["wrap_out"] == "KeyUnextractable"


async def test_generate_refuses_an_existing_label(softhsm: SoftHSM, token: Token, root):
    with pytest.raises(ConfigError, match="already holds an object labelled 'skm-root'"):
        await generate_root_key(softhsm.config(token))


async def test_wrap_unwrap_round_trip(root):
    sk = os.urandom(32)
    blob = await root.wrap(sk, 3)
    assert len(blob) == 12 + 32 + 16
    assert sk not in blob
    assert await root.unwrap(blob, 3) == sk
    assert await root.wrap(sk, 3) != blob  # fresh nonce every time
    with pytest.raises(WrongRootKey):
        await root.unwrap(blob, 4)  # AAD binds the version
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(WrongRootKey):
        await root.unwrap(tampered, 3)
    with pytest.raises(WrongRootKey):
        await root.unwrap(b"short", 3)


async def test_concurrent_calls_share_one_session(root):
    keys = [os.urandom(32) for _ in range(40)]
    blobs = await asyncio.gather(*(root.wrap(k, i) for i, k in enumerate(keys)))
    assert await asyncio.gather(*(root.unwrap(b, i) for i, b in enumerate(blobs))) == keys


async def test_blob_interoperates_with_file_root_key_only_when_the_key_matches(
        softhsm: SoftHSM, token: Token, tmp_path: Path):
    raw = os.urandom(32)
    softhsm.import_aes_key(token, "known-root", raw)
    hsm = PKCS11RootKey.from_config(softhsm.config(token, key_label="known-root"))
    same = tmp_path / "same.key"
    write_private_file(same, raw)
    file_same = FileRootKey(same)
    file_other = FileRootKey.create(tmp_path / "other.key")
    try:
        sk = os.urandom(32)
        # token -> file, and a plain cryptography AES-GCM unwrap of the same format
        blob = await hsm.wrap(sk, 1)
        assert await file_same.unwrap(blob, 1) == sk
        assert AESGCM(raw).decrypt(blob[:12], blob[12:], wrap_aad(1)) == sk
        with pytest.raises(WrongRootKey):
            await file_other.unwrap(blob, 1)
        # file -> token
        blob2 = await file_same.wrap(sk, 2)
        assert await hsm.unwrap(blob2, 2) == sk
        with pytest.raises(WrongRootKey):
            await hsm.unwrap(await file_other.wrap(sk, 2), 2)
    finally:
        await hsm.close()


async def test_wrong_pin_is_a_clear_config_error(softhsm: SoftHSM, token: Token, root,
                                                 monkeypatch: pytest.MonkeyPatch):
    await root.close()  # log out, so the next login really checks the PIN
    wrong = "wrong-pin-9876"
    monkeypatch.setenv("SKM_TEST_PKCS11_PIN", wrong)
    bad = PKCS11RootKey.from_config(softhsm.config(token))
    with pytest.raises(ConfigError) as ei:
        await bad.open()
    msg = str(ei.value)
    assert "PIN" in msg and "SKM_TEST_PKCS11_PIN" in msg and token.label in msg
    assert wrong not in msg and token.pin not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__
    with pytest.raises(ConfigError):
        await bad.unwrap(os.urandom(60), 1)
    await bad.close()


async def test_missing_token_key_module_and_pin_name_what_to_fix(softhsm: SoftHSM, token: Token,
                                                                 monkeypatch: pytest.MonkeyPatch):
    p = PKCS11RootKey.from_config(softhsm.config(Token("no-such-token", token.pin)))
    with pytest.raises(ConfigError, match="no PKCS#11 token labelled 'no-such-token'.*token_label"):
        await p.open()
    p = PKCS11RootKey.from_config(softhsm.config(token, key_label="absent"))
    with pytest.raises(ConfigError, match="no AES key labelled 'absent'"):
        await p.open()
    await p.close()
    with pytest.raises(ConfigError, match="rootkey.module"):
        PKCS11RootKey.from_config(softhsm.config(token, module="/nonexistent/libp11.so"))
    monkeypatch.delenv("SKM_TEST_PKCS11_PIN")
    with pytest.raises(ConfigError, match="SKM_TEST_PKCS11_PIN"):
        PKCS11RootKey.from_config(softhsm.config(token))


async def test_pin_file_must_be_private(softhsm: SoftHSM, token: Token, root, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SKM_TEST_PKCS11_PIN")
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    os.chmod(pin_file, 0o640)
    with pytest.raises(ConfigError, match="readable by group or others") as ei:
        PKCS11RootKey.from_config(softhsm.config(token, pin_file=str(pin_file)))
    assert token.pin not in str(ei.value)
    os.chmod(pin_file, 0o600)
    await root.close()
    p = PKCS11RootKey.from_config(softhsm.config(token, pin_file=str(pin_file)))
    try:
        sk = os.urandom(32)
        assert await p.unwrap(await p.wrap(sk, 1), 1) == sk
    finally:
        await p.close()


async def test_unseal_through_softhsm_and_root_rotation_from_file(softhsm: SoftHSM, token: Token, root,
                                                                  tmp_path: Path):
    # make_provider is how the key server builds it
    provider = make_provider(softhsm.config(token), tmp_path / "unused")
    assert isinstance(provider, PKCS11RootKey)
    try:
        file_root = FileRootKey.create(tmp_path / "root.key")
        ring = await new_keyring(file_root)
        moved = await rewrap(ring, file_root, provider)  # `skm rootkey rotate` file -> pkcs11
        assert moved.current == ring.current and moved.versions.keys() == ring.versions.keys()
        with pytest.raises(WrongRootKey):
            await moved.unwrap_all(file_root)
        barrier = Barrier()
        barrier.unseal(await moved.unwrap_all(provider), moved.current)
        blob = barrier.seal(b"secret", b"aad")
        other = Barrier()
        other.unseal(await ring.unwrap_all(file_root), ring.current)
        assert other.open(blob, b"aad") == b"secret"  # same system key, only re-wrapped
    finally:
        await provider.close()


async def test_session_survives_a_logout_by_another_provider(softhsm: SoftHSM, token: Token, root):
    second = PKCS11RootKey.from_config(softhsm.config(token))
    await second.open()               # logs the application in
    sk = os.urandom(32)
    blob = await root.wrap(sk, 1)     # joins the existing login
    await second.close()              # C_Logout: logs out every session of this process
    assert await root.unwrap(blob, 1) == sk  # reconnects and logs in again
