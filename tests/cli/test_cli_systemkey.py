"""`skm systemkey ...`, `skm server export-keyring`, `skm barrier ...` as a user runs them (real processes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from server.barrier.keyring import load_keyring_file
from server.init import init_server
from tests.support.server import make_config
from tests.systemkey.test_sealed_start import run_cli, stack_of


async def _exported_keyring(tmp_path: Path) -> tuple[Path, Path]:
    """An initialised key-server dir and its exported keyring file."""
    cfg = make_config(tmp_path / "keyserver")
    await init_server(cfg)
    out = tmp_path / "export.json"
    code, text, err = await run_cli("server", "export-keyring", "--data-dir", str(cfg.data_path), "--out", str(out))
    assert code == 0, err
    return cfg.data_path, out


async def test_export_keyring_moves_the_keyring_off_the_key_server(tmp_path: Path):
    ks_dir, out = await _exported_keyring(tmp_path)
    assert not (ks_dir / "systemkey.json").exists()
    assert os.stat(out).st_mode & 0o777 == 0o600 and load_keyring_file(out).current == 1
    code, _, err = await run_cli("server", "export-keyring", "--data-dir", str(ks_dir), "--out",
                                 str(tmp_path / "again.json"))
    assert code == 1 and "already exported" in err and not (tmp_path / "again.json").exists()


async def test_systemkey_admin_commands(tmp_path: Path):
    ks_dir, exported = await _exported_keyring(tmp_path)
    sk = ["--data-dir", str(tmp_path / "sk")]
    code, _, err = await run_cli("systemkey", "init", *sk, "--keyring", str(tmp_path / "missing.json"))
    assert code == 1 and "does not exist" in err
    code, out, err = await run_cli("systemkey", "init", *sk, "--keyring", str(exported), "--pki", str(ks_dir / "pki"))
    assert code == 0, err
    assert "allow-listed key servers: 0" in out and "Delete" in out
    assert (tmp_path / "sk" / "pki" / "systemkey.pem").exists()
    assert os.stat(tmp_path / "sk" / "pki" / "systemkey-key.pem").st_mode & 0o777 == 0o600
    code, _, err = await run_cli("systemkey", "init", *sk, "--keyring", str(exported))
    assert code == 1 and "already exists" in err

    # allow-list: by certificate file, by fingerprint in openssl's spelling, bad input
    code, out, err = await run_cli("systemkey", "allow", *sk, str(ks_dir / "pki" / "server.pem"), "--note", "ks1")
    assert code == 0 and "allowed" in out
    fp = "ab" * 32
    colons = ":".join(["AB"] * 32)
    code, out, _ = await run_cli("systemkey", "allow", *sk, colons)
    assert code == 0 and out.strip() == "allowed"
    code, out, _ = await run_cli("systemkey", "allow", *sk, fp)
    assert code == 0 and out.strip() == "already allowed"
    code, _, err = await run_cli("systemkey", "allow", *sk, "not-a-fingerprint")
    assert code == 1 and "64 hex digits" in err
    code, out, _ = await run_cli("systemkey", "list", *sk, "--json")
    listed = json.loads(out)
    assert code == 0 and len(listed) == 2 and listed[0]["note"] == "ks1" and listed[1]["fingerprint"] == fp
    code, out, _ = await run_cli("systemkey", "revoke", *sk, fp)
    assert code == 0
    code, _, err = await run_cli("systemkey", "revoke", *sk, fp)
    assert code == 4 and "not on the allow-list" in err

    # rotate needs the right root key; a wrong one changes nothing
    keyring = tmp_path / "sk" / "keyring.json"
    before = keyring.read_bytes()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f'data_dir = "{tmp_path / "elsewhere"}"\n[rootkey]\npath = "{tmp_path / "wrong.key"}"\n')
    code, _, err = await run_cli("rootkey", "generate", "-c", str(wrong))
    assert code == 0, err
    code, _, err = await run_cli("systemkey", "rotate", *sk, "--rootkey-config", str(wrong))
    assert code == 1 and "Wrong Root Key" in err and keyring.read_bytes() == before
    code, out, err = await run_cli("systemkey", "rotate", *sk, "--server-data-dir", str(ks_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["current"] == 2

    code, _, err = await run_cli("systemkey", "retire", *sk, "2")
    assert code == 1 and "current" in err
    code, out, err = await run_cli("systemkey", "retire", *sk, "1")
    assert code == 0, err
    code, out, _ = await run_cli("systemkey", "status", *sk, "--json")
    st = json.loads(out)
    assert st["current"] == 2 and st["versions"] == [1, 2] and st["retired"] == [1] and st["allowed"] == 1
    ring = load_keyring_file(keyring)
    for blob in ring.versions.values():  # status shows versions, never wrapped blobs
        assert blob.hex() not in out


async def test_barrier_commands_while_sealed_and_after(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        h = await st.start_keyserver()
        env = {"SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert)}
        for cmd in (["barrier", "status"], ["barrier", "rewrap"], ["barrier", "refresh"]):
            code, _, err = await run_cli(*cmd, env=env)
            assert code == 6 and "Sealed" in err and "unreachable" in err, (cmd, err)
        await st.start_systemkey()
        from tests.systemkey.test_sealed_start import wait_unsealed
        await wait_unsealed(h)
        code, out, err = await run_cli("barrier", "status", env=env)
        assert code == 0 and "current version" in out, err
        code, out, err = await run_cli("barrier", "refresh", "--json", env=env)
        assert code == 0 and json.loads(out)["added"] == []
        code, _, err = await run_cli("barrier", "retire", "1", env=env)
        assert code == 5 and "current" in err
        code, _, err = await run_cli("barrier", "retire", "7", env=env)
        assert code == 1 and "no system-key version 7" in err
        code, _, err = await run_cli("barrier", "status", env={**env, "SKM_TOKEN": "skm_bad"})
        assert code == 3
