"""System-key rotation under load and root-key rotation, driven by the real `skm` CLI.

* `skm systemkey rotate` → `skm barrier refresh` → `skm barrier rewrap` (a subprocess
  with its progress bar) over a few thousand records while a writer and a reader use
  the management and client APIs: no error, nothing lost, every record on the new
  version, then the old version is retired.
* `skm rootkey rotate` file → file (local keyring) and file → PKCS#11 (system-key
  server): the database is untouched and the server starts with the new root key.
"""
from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from server.app import KeyServer
from server.barrier.keyring import load_keyring_file
from server.barrier.rewrap import count_by_version
from server.barrier.rootkey import FileRootKey, WrongRootKey
from server.config import load
from server.errors import ConfigError
from server.init import init_server
from server.settings import ServerConfig
from server.storage.migrations import SEALED_COLUMNS
from tests.support.server import Harness, make_config
from tests.support.softhsm import SoftHSM, softhsm  # noqa: F401  (fixture)
from tests.systemkey.test_sealed_start import run_cli, stack_of, wait_unsealed

RECORDS = 3000


def mgmt_env(h: Harness) -> dict:
    return {"SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert)}


def server_toml(path: Path, data_dir: Path, extra: str = "") -> Path:
    path.write_text(f'data_dir = "{data_dir}"\n[data]\nport = 0\n[mgmt]\nport = 0\n{extra}')
    return path


def sealed_rows(db: Path) -> dict[tuple, bytes]:
    con = sqlite3.connect(db)
    try:
        return {(t, c, *row[:-1]): bytes(row[-1]) for t, c, pk in SEALED_COLUMNS
                for row in con.execute(f"SELECT {', '.join(pk)}, {c} FROM {t} WHERE {c} IS NOT NULL")}
    finally:
        con.close()


# --- system-key rotation under load ---------------------------------------------------------
async def test_rewrap_under_load_with_the_cli(tmp_path: Path):
    async with stack_of(tmp_path) as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        rt = h.rt
        env = mgmt_env(h)
        store = await h.keystore("load")
        ks = await rt.keys.keystore(store["keyStoreId"])
        expected: dict[str, str] = {}
        # The audit seals its checkpoint key and epoch at the first start checkpoint: count after it.
        while rt.audit.checkpointer is None or not rt.audit.checkpointer._started:
            await asyncio.sleep(0.02)
        base = sum((await count_by_version(rt.storage)).values())  # sealed records init made (operators, ...)
        t0 = time.monotonic()
        for i in range(RECORDS):
            value = f"v{i}-{os.urandom(6).hex()}"
            key = await rt.keys.create_key(ks, "SECRET", f"k{i}", actor="test", secret_value=value)
            expected[key.id] = value
        created_in = time.monotonic() - t0
        assert await count_by_version(rt.storage) == {1: RECORDS + base}

        # rotate on the system-key host (needs the root key: the key server's config names it)
        ks_toml = server_toml(tmp_path / "keyserver.toml", st.ks_cfg.data_path)
        code, out, err = await run_cli("systemkey", "rotate", "--data-dir", str(st.sk_cfg.data_path),
                                       "--rootkey-config", str(ks_toml), "--json")
        assert code == 0, err
        code, out, err = await run_cli("barrier", "refresh", "--json", env=env)
        assert code == 0, err
        assert rt.barrier.current_version == 2 and rt.barrier.versions() == [1, 2]
        # the old version cannot be retired while records use it
        code, out, err = await run_cli("barrier", "retire", "1", env=env)
        assert code == 5 and f"{RECORDS + base} record(s) are still sealed under version 1" in err

        # a writer and a reader during the rewrap
        reader_keys = list(expected)[: RECORDS // 2]
        writer_keys = list(expected)[RECORDS // 2:]
        errors: list[str] = []
        during = {"reads": 0, "writes": 0}
        stop = asyncio.Event()

        def running() -> bool:
            job = rt.extra.get("rewrap_job")
            return job is not None and job.state == "running"

        async def reader() -> None:
            while not stop.is_set():
                kid = random.choice(reader_keys)
                s, body = await h.client("GET", f"/secrets/{kid}")
                if s != 200 or body["body"]["secret"] != expected[kid]:
                    errors.append(f"read {kid}: {s} {body['header']}")
                if running():
                    during["reads"] += 1

        async def writer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                value = f"new-{n}-{os.urandom(4).hex()}"
                s, body = await h.mgmt("POST", f"/keystores/{ks.id}/keys",
                                       json={"keyType": "SECRET", "name": f"w{n}", "secretValue": value})
                if s != 201:
                    errors.append(f"create: {s} {body['header']}")
                else:
                    expected[body["body"]["keyId"]] = value
                kid = random.choice(writer_keys)
                value = f"rot-{n}-{os.urandom(4).hex()}"
                s, body = await h.mgmt("POST", f"/keys/{kid}/rotate", json={"secretValue": value})
                if s != 200:
                    errors.append(f"rotate {kid}: {s} {body['header']}")
                else:
                    expected[kid] = value
                if running():
                    during["writes"] += 1

        tasks = [asyncio.create_task(reader()), asyncio.create_task(reader()), asyncio.create_task(writer())]
        try:
            code, out, err = await run_cli("barrier", "rewrap", "--batch", "50", env=env, timeout=300)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert code == 0, err
        assert "rewrap done" in out and "now on system-key version 2" in out
        assert "re-sealing under version 2" in err  # the progress bar (stderr)
        assert errors == []
        assert during["reads"] > 0 and during["writes"] > 0, (during, created_in)

        # nothing lost, everything on version 2
        counts = await count_by_version(rt.storage)
        assert set(counts) == {2} and counts[2] >= RECORDS
        for kid, value in expected.items():
            assert await rt.keys.secret_value(await rt.keys.key(kid)) == value
        job = rt.extra["rewrap_job"]
        assert job.state == "done" and job.done == job.total >= RECORDS
        async with h._default().get(h.mgmt_url + "/metrics") as r:
            metrics = await r.text()
        assert f"skm_rewrap_records_done {float(job.done)}" in metrics
        assert f"skm_rewrap_records_total {float(job.total)}" in metrics

        code, out, err = await run_cli("barrier", "status", "--json", env=env)
        assert code == 0 and '"recordsByVersion": {\n    "2"' in out
        code, out, err = await run_cli("barrier", "retire", "1", "--json", env=env)
        assert code == 0, err
        assert rt.barrier.versions() == [2]
        code, out, err = await run_cli("systemkey", "retire", "1", "--data-dir", str(st.sk_cfg.data_path))
        assert code == 0, err

        # a restart unwraps only version 2 and still reads everything
        await st.stop_keyserver()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        assert h.rt.barrier.versions() == [2]
        for kid in random.sample(list(expected), 200):
            s, body = await h.client("GET", f"/secrets/{kid}")
            assert s == 200 and body["body"]["secret"] == expected[kid]


# --- root-key rotation ----------------------------------------------------------------------
async def test_root_key_rotation_file_to_file(tmp_path: Path):
    data = tmp_path / "data"
    cfg = make_config(data)
    await init_server(cfg)
    server = await KeyServer(cfg).start()
    h = Harness(server, None, tmp_path)  # type: ignore[arg-type]
    try:
        store = await h.rt.keys.create_keystore((await h.rt.keys.default_project()).id, "s", actor="t", ip4_auth=True)
        key = await h.rt.keys.create_key(store, "SECRET", "pw", actor="t", secret_value="kept-across-root-keys")
    finally:
        await server.stop()
    before = sealed_rows(data / "skm.db")
    old_toml = server_toml(tmp_path / "old.toml", data)
    new_toml = server_toml(tmp_path / "new.toml", data, f'[rootkey]\npath = "{tmp_path / "new-root.key"}"\n')
    code, out, err = await run_cli("rootkey", "generate", "-c", str(new_toml))
    assert code == 0, err
    assert os.stat(tmp_path / "new-root.key").st_mode & 0o777 == 0o600
    code, _, err = await run_cli("rootkey", "generate", "-c", str(new_toml))
    assert code == 1 and "refusing to replace" in err
    code, out, err = await run_cli("rootkey", "rotate", "--from-config", str(old_toml), "--to-config", str(new_toml),
                                   "--json")
    assert code == 0, err
    assert sealed_rows(data / "skm.db") == before  # user data untouched

    ring = load_keyring_file(data / "systemkey.json")
    with pytest.raises(WrongRootKey):
        await ring.unwrap_all(FileRootKey(data / "root.key"))
    with pytest.raises(ConfigError):
        await KeyServer(load(ServerConfig, old_toml, env={})).start()
    server = await KeyServer(load(ServerConfig, new_toml, env={})).start()
    try:
        assert await server.runtime.keys.secret_value(await server.runtime.keys.key(key.id)) == "kept-across-root-keys"
    finally:
        await server.stop()
    # rotating again from the old root key fails and changes nothing
    raw = (data / "systemkey.json").read_bytes()
    code, _, err = await run_cli("rootkey", "rotate", "--from-config", str(old_toml), "--to-config", str(new_toml))
    assert code == 1 and "Wrong Root Key" in err and (data / "systemkey.json").read_bytes() == raw


async def test_root_key_rotation_file_to_pkcs11_on_the_system_key_server(tmp_path: Path, softhsm: SoftHSM,
                                                                          monkeypatch: pytest.MonkeyPatch):
    token = softhsm.new_token()
    monkeypatch.setenv("SKM_TEST_PKCS11_PIN", token.pin)
    async with stack_of(tmp_path / "stack") as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        store = await h.keystore("hsm")
        key = await h.key(store, "SECRET", "pw", secretValue="moved-to-the-hsm")
        await st.stop_keyserver()
        data = st.ks_cfg.data_path
        before = sealed_rows(data / "skm.db")
        rk = softhsm.config(token)
        old_toml = server_toml(tmp_path / "old.toml", data)
        new_toml = server_toml(tmp_path / "new.toml", data, f'''[rootkey]
provider = "pkcs11"
module = "{rk.module}"
token_label = "{rk.token_label}"
key_label = "{rk.key_label}"
pin_env = "SKM_TEST_PKCS11_PIN"
''')
        code, out, err = await run_cli("rootkey", "generate", "-c", str(new_toml))
        assert code == 0, err
        assert "pkcs11 token" in out
        attrs = softhsm.inspect_key(token, rk.key_label)
        assert attrs["EXTRACTABLE"] is False and attrs["read_value"] == "AttributeSensitive"
        code, out, err = await run_cli("rootkey", "rotate", "--from-config", str(old_toml), "--to-config",
                                       str(new_toml), "--systemkey-data-dir", str(st.sk_cfg.data_path))
        assert code == 0, err
        assert sealed_rows(data / "skm.db") == before
        ring = load_keyring_file(st.sk_cfg.keyring_path())
        with pytest.raises(WrongRootKey):
            await ring.unwrap_all(FileRootKey(data / "root.key"))
        # the key server starts with the HSM root key and reads everything
        import dataclasses
        cfg = dataclasses.replace(st.ks_cfg, rootkey=rk)
        h = await st.start_keyserver(cfg)
        await wait_unsealed(h)
        s, body = await h.client("GET", f"/secrets/{key['keyId']}")
        assert s == 200 and body["body"]["secret"] == "moved-to-the-hsm"
