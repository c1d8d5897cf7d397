"""Outgrowing one machine: a SQLite store moves to PostgreSQL through `skm backup create` and
`skm backup restore --storage`, and everything (the full client-API suite included) works there."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.backup import REPO, make_installation, run_skm
from tests.support.postgres import session_cluster


def ok(status: int, out: dict) -> dict:
    assert status in (200, 201), out
    return out["body"]


async def test_a_sqlite_store_moves_to_postgresql(request, tmp_path):
    cluster = session_cluster(request.config)
    inst = await make_installation(tmp_path / "site")
    h = await inst.start()
    try:
        assert h.rt.storage.dialect == "sqlite"
        store = await h.keystore("moving")
        secret = await h.key(store, "SECRET", "db-password", secretValue="s3cret-before-the-move")
        aes = (await h.key(store, "SYMMETRIC_KEY", "aes"))["keyId"]
        enc = ok(*await h.client("POST", f"/symmetric-keys/{aes}/encrypt", json={"plaintext": "old data"}))
        ok(*await h.mgmt("POST", f"/keys/{aes}/rotate"))
        rsa = (await h.key(store, "ASYMMETRIC_KEY", "rsa"))["keyId"]
        sig = ok(*await h.client("POST", f"/asymmetric-keys/{rsa}/sign", json={"plaintext": "signed"}))
        backup = tmp_path / "move.skmbak"
        code, _out, err = await run_skm("backup", "create", "--out", str(backup), env=inst.env(h))
        assert code == 0, err
    finally:
        await h.close()

    with cluster.database() as url:
        code, out, err = await run_skm("backup", "restore", str(backup), "--config", str(inst.config_path),
                                       "--storage", url, env=inst.env())
        assert code == 0, err
        assert "restored" in out and "postgresql://postgres@127.0.0.1" in out
        inst.set_storage(url)
        h = await inst.start()
        try:
            assert h.rt.storage.dialect == "postgresql"
            assert ok(*await h.client("GET", f"/secrets/{secret['keyId']}"))["secret"] == "s3cret-before-the-move"
            dec = ok(*await h.client("POST", f"/symmetric-keys/{aes}/decrypt", json={"ciphertext": enc["ciphertext"]}))
            assert dec == {"plaintext": "old data", "keyVersion": 0}
            new = ok(*await h.client("POST", f"/symmetric-keys/{aes}/encrypt", json={"plaintext": "x"}))
            assert new["keyVersion"] == 1
            ver = ok(*await h.client("POST", f"/asymmetric-keys/{rsa}/verify",
                                     json={"plaintext": "signed", "signature": sig["signature"]}))
            assert ver["result"] is True
            # Generated ids continue after the moved ones (the PostgreSQL sequences were set).
            store2 = await h.keystore("after-the-move")
            assert store2["keyStoreId"] > store["keyStoreId"]
        finally:
            await h.close()
        code, out, err = await run_skm("audit", "verify", "--config", str(inst.config_path), env=inst.env())
        assert code == 0 and "audit chain intact" in out, out + err


def test_the_client_api_suite_passes_on_a_store_restored_into_postgresql(tmp_path):
    """tests/api/test_client_api.py, every server on a store moved SQLite -> PostgreSQL by backup and restore
    (SKM_TEST_RESTORED=1, tests/support/server.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_TEST_")}
    env.update(SKM_TEST_STORAGE="postgresql", SKM_TEST_RESTORED="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp_path / "suite"), "tests/api/test_client_api.py",
                        "tests/replicas/test_harness_backend.py"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = p.stdout[-3000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    m = re.search(r"(\d+) passed", p.stdout)
    assert m and int(m.group(1)) >= 19, tail
    assert not re.search(r"\d+ (failed|skipped|error)", p.stdout), tail
