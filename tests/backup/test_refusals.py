"""What a backup refuses, with a message naming what is wrong and nothing written; and what a
backup file never holds (secret values, key material, the system key, the root key)."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from server.backup.keys import unsealed_barrier
from server.barrier.keyring import load_keyring_file
from server.barrier.providers import make_provider
from tests.support.backup import make_installation, run_skm

SECRETS = ["correct horse battery staple", "pa55-wörd-✓-0042", "A" * 40]


@pytest.fixture
async def site(tmp_path):
    """An installation with secrets and exportable keys, a backup of it made by `skm backup create`."""
    inst = await make_installation(tmp_path / "site")
    h = await inst.start()
    try:
        store = await h.keystore("s")
        raw: list[bytes] = [s.encode() for s in SECRETS]
        for i, value in enumerate(SECRETS):
            await h.key(store, "SECRET", f"secret{i}", secretValue=value)
        aes = (await h.key(store, "SYMMETRIC_KEY", "aes", exportable=True))["keyId"]
        rsa = (await h.key(store, "ASYMMETRIC_KEY", "rsa", exportable=True))["keyId"]
        st, out = await h.client("GET", f"/symmetric-keys/{aes}/symmetric-key")
        assert st == 200, out
        raw.append(base64.b64decode(out["body"]["symmetricKey"]))
        st, out = await h.client("GET", f"/asymmetric-keys/{rsa}/privateKey")
        assert st == 200, out
        raw.append(base64.b64decode(out["body"]["encodedKey"]))
        audit_key = await h.rt.audit.hmac_key()
        raw.append(audit_key)
        backup = tmp_path / "site.skmbak"
        code, _out, err = await run_skm("backup", "create", "--out", str(backup), env=inst.env(h))
        assert code == 0, err
        counts = {t: await h.rt.storage.fetchval(f"SELECT COUNT(*) AS n FROM {t}") for t in ("keys", "audit_log")}
    finally:
        await h.close()
    # The system key and the root key themselves.
    cfg = inst.config()
    root = make_provider(cfg.rootkey, cfg.root_key_path())
    ring = load_keyring_file(cfg.system_key_path())
    system_keys = await ring.unwrap_all(root)
    await root.close()
    raw += list(system_keys.values()) + [cfg.root_key_path().read_bytes()]
    return inst, backup, raw, counts


def _encodings(b: bytes) -> list[bytes]:
    out = [b, b.hex().encode(), base64.b64encode(b), base64.urlsafe_b64encode(b).rstrip(b"=")]
    if len(b) > 12:      # a base64 text of the value starting at any byte offset shows one of these runs
        out += [base64.b64encode(b[i:])[4:-4] for i in range(3)]
    return out


async def test_backup_holds_no_secret_value_and_no_raw_key_byte(site):
    inst, backup, raw, _ = site
    data = backup.read_bytes()
    assert len(raw) == len(SECRETS) + 5     # + AES key, RSA private key, audit key, system key, root key
    for value in raw:
        for enc in _encodings(value):
            assert enc not in data, f"the backup holds a secret or key in clear ({len(value)} bytes)"
    manifest = json.loads(data.split(b"\n", 1)[0])
    assert manifest["systemKeyVersions"] == [1] and manifest["mac"]["systemKeyVersion"] == 1
    assert manifest["tables"] and manifest["auditHead"]["seq"] > 0
    assert "root" not in json.dumps(manifest).lower()
    assert oct(backup.stat().st_mode & 0o777) == "0o600"


def _payload(data: bytes) -> tuple[int, int]:
    """(offset, size) of the database image inside a format 2 file."""
    first = data.index(b"\n") + 1
    return first, json.loads(data[:first])["payload"]["bytes"]


def _flip_in_blob(data: bytes) -> bytes:
    """One bit inside the image's last page (row data, not the header SQLite would reject first)."""
    at, size = _payload(data)
    i = at + size - 100
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def _splice(data: bytes) -> bytes:
    """Swap two pages of the image: every page intact, their order (what they mean together) not."""
    at, size = _payload(data)
    page = int.from_bytes(data[at + 16:at + 18], "big")
    assert size >= 4 * page
    a, b = at + page, at + 2 * page
    return data[:a] + data[b:b + page] + data[a:b] + data[b + page:]


def _edit_manifest(data: bytes) -> bytes:
    """One bit of the manifest's creation time: still a valid manifest, no longer the one the MAC covers."""
    at = data.index(b'"createdAt":"') + len(b'"createdAt":"') + 3
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _newer_format(data: bytes) -> bytes:
    first, rest = data.split(b"\n", 1)
    m = json.loads(first)
    m["formatVersion"] = 4
    return json.dumps(m, separators=(",", ":")).encode() + b"\n" + rest


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:len(d) // 2], "the file is truncated"),
    (lambda d: d[:d.rstrip(b"\n").rfind(b"\n") + 1], "without its integrity trailer"),
    (_flip_in_blob, "integrity check failed"),
    (_splice, "spliced"),
    (_edit_manifest, "integrity check failed"),
    (_newer_format, "unknown backup format version 4"),
    (lambda d: d + d.split(b"\n", 1)[0] + b"\n", "data after its integrity trailer"),
], ids=["truncated-half", "truncated-trailer", "bit-flip", "spliced", "manifest-flip", "format-version", "appended"])
async def test_a_damaged_file_is_refused_and_nothing_is_written(site, tmp_path, damage, message):
    inst, backup, _, _ = site
    bad = tmp_path / "bad.skmbak"
    bad.write_bytes(damage(backup.read_bytes()))
    code, out, err = await run_skm("backup", "verify", str(bad), "--config", str(inst.config_path), env=inst.env())
    assert code == 1 and message in err, (out, err)
    target = tmp_path / "fresh"
    code, out, err = await run_skm("backup", "restore", str(bad), "--config", str(inst.config_path),
                                   "--data-dir", str(target), env=inst.env())
    assert code == 1 and message in err and "nothing was restored" in err, (out, err)
    assert not (target / "skm.db").exists()
    assert "Traceback" not in err


async def test_a_backup_of_another_installation_is_refused(site, tmp_path):
    _inst, backup, _, _ = site
    other = await make_installation(tmp_path / "other")
    target = tmp_path / "fresh"
    for args in (["verify", str(backup)], ["restore", str(backup), "--data-dir", str(target)]):
        code, out, err = await run_skm("backup", *args, "--config", str(other.config_path), env=other.env())
        assert code == 1, (out, err)
        assert "different system key" in err and "another installation" in err, err
    assert not (target / "skm.db").exists()


async def test_a_store_that_is_not_empty_is_refused_unless_forced(site, tmp_path):
    inst, backup, _, counts = site
    # The installation's own data dir still holds its store: restoring over it is refused...
    code, out, err = await run_skm("backup", "restore", str(backup), "--config", str(inst.config_path),
                                   "--data-dir", str(inst.data_dir), env=inst.env())
    assert code == 5, (out, err)
    assert "is not empty" in err and "--force" in err and "keys (" in err, err
    h = await inst.start()
    try:
        store = await h.keystore("after-backup")
        await h.key(store, "SECRET", "late", secretValue="written after the backup")
        late_counts = {t: await h.rt.storage.fetchval(f"SELECT COUNT(*) AS n FROM {t}") for t in ("keys", "audit_log")}
    finally:
        await h.close()
    assert late_counts["keys"] == counts["keys"] + 1
    # ...and with --force the store is exactly the backup's again.
    code, out, err = await run_skm("backup", "restore", str(backup), "--config", str(inst.config_path),
                                   "--data-dir", str(inst.data_dir), "--force", env=inst.env())
    assert code == 0, err
    manifest = json.loads(backup.read_bytes().split(b"\n", 1)[0])
    h = await inst.start()
    try:
        for t in manifest["tables"]:
            assert await h.rt.storage.fetchval(f"SELECT COUNT(*) AS n FROM {t['name']}") == t["count"], t
        assert manifest["tables"][[t["name"] for t in manifest["tables"]].index("keys")]["count"] == counts["keys"]
    finally:
        await h.close()


async def test_a_missing_system_key_version_is_named(site, tmp_path):
    """A backup needs the system-key versions its manifest lists; a keyring without them is told which."""
    inst, backup, _, _ = site
    async with unsealed_barrier(inst.config()) as barrier:
        from server.backup.restore import verify_file
        report = await verify_file(backup, barrier)
        assert report.unsealed.get("key_versions.material_sealed", 0) >= 5
        barrier.add_version(2, os.urandom(32))      # rotate: the backup still verifies under version 1
        assert (await verify_file(backup, barrier)).records == report.records
        barrier.retire(1)
        from server.backup.format import InvalidBackup
        with pytest.raises(InvalidBackup, match=r"version\(s\) 1"):
            await verify_file(backup, barrier)
    assert Path(backup).exists()
