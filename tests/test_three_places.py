"""Three places: the database, the system-key server's files and the root key.

A real key server (root key file, SQLite) fetches its system key from a real
system-key server. After secrets are written through the API, an "attacker"
gets the files of some of the three places and tries the obvious: every 32-byte
string found in them (raw, base64- and hex-decoded) as an AES-256-GCM key
against every wrapped system key (with its AAD) and every sealed record (with
its right AAD), plus every system key it manages to unwrap. Any two places
yield nothing; all three yield every secret, so the attack itself works.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.barrier.barrier import sealed_aad
from server.barrier.keyring import WrappedKeyring
from server.barrier.rootkey import wrap_aad
from server.keys.formats import cipher_aad
from server.storage.migrations import SEALED_COLUMNS
from tests.systemkey.test_sealed_start import stack_of, wait_unsealed

PLAINTEXT = "attack at dawn"
_B64 = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(rb"[0-9a-fA-F]{64,}")


@dataclass
class Loot:
    system_keys: set[bytes] = field(default_factory=set)
    plaintexts: dict[tuple, bytes] = field(default_factory=dict)   # (table, column, *pk) -> plaintext


def _pieces(data: bytes) -> list[bytes]:
    """The bytes of a file plus everything base64 or hex inside it decodes to."""
    out = [data]
    for m in _B64.finditer(data):
        tok = m.group().rstrip(b"=")
        for alt in (False, True):
            try:
                dec = (base64.urlsafe_b64decode if alt else base64.b64decode)(tok + b"=" * (-len(tok) % 4))
            except (binascii.Error, ValueError):
                continue
            if len(dec) >= 32:
                out.append(dec)
    for m in _HEX.finditer(data):
        h = m.group()
        out.append(bytes.fromhex(h[: len(h) // 2 * 2].decode()))
    return out


def _windows(pieces: list[bytes]) -> set[bytes]:
    return {p[i:i + 32] for p in pieces for i in range(0, len(p) - 31)}


def _db_values(db_files: list[Path], scratch: Path) -> tuple[list[bytes], list[tuple[tuple, bytes, bytes]]]:
    """Every stored value, and the sealed records with their (public) AAD, read with plain sqlite3."""
    scratch.mkdir()
    for f in db_files:
        shutil.copy(f, scratch / f.name)
    main = next(scratch / f.name for f in db_files if f.name.endswith(".db"))
    con = sqlite3.connect(main)
    try:
        values: list[bytes] = []
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for v in row:
                    if isinstance(v, bytes):
                        values.append(v)
                    elif isinstance(v, str):
                        values.append(v.encode())
        sealed = []
        for table, column, pk in SEALED_COLUMNS:
            for row in con.execute(f"SELECT {', '.join(pk)}, {column} FROM {table} WHERE {column} IS NOT NULL"):
                ident = (table, column, *row[:-1])
                sealed.append((ident, bytes(row[-1]), sealed_aad(table, column, *row[:-1])))
        return values, sealed
    finally:
        con.close()


def _keyrings(files: list[Path]) -> list[WrappedKeyring]:
    rings = []
    for f in files:
        try:
            data = json.loads(f.read_bytes())
            rings.append(WrappedKeyring.from_json(data))
        except Exception:  # noqa: BLE001 - not a keyring: the attacker moves on
            continue
    return rings


def _try_open(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        return None


def attack(files: list[Path], scratch: Path) -> Loot:
    """Everything the files of some places yield to the obvious decryptions."""
    loot = Loot()
    db_files = [f for f in files if ".db" in f.name]
    other = [f for f in files if f not in db_files]
    pieces: list[bytes] = []
    for f in other:
        pieces += _pieces(f.read_bytes())
    sealed: list[tuple[tuple, bytes, bytes]] = []
    if db_files:
        values, sealed = _db_values(db_files, scratch)
        for v in values:
            pieces += _pieces(v)
    candidates = _windows(pieces)
    # 1. unwrap every wrapped system key found with every candidate (only the root key should do)
    for ring in _keyrings(other):
        for version, wrapped in ring.versions.items():
            for c in candidates:
                key = _try_open(c, wrapped, wrap_aad(version))
                if key is not None:
                    loot.system_keys.add(key)
    # 2. open every sealed record (right AAD) with every candidate and every unwrapped system key
    for ident, blob, aad in sealed:
        for c in candidates | loot.system_keys:
            plain = _try_open(c, blob[4:], aad)
            if plain is not None:
                loot.plaintexts[ident] = plain
    return loot


async def test_any_two_places_yield_nothing_all_three_yield_every_secret(tmp_path: Path):
    secrets: dict[str, str] = {}
    async with stack_of(tmp_path / "stack") as st:
        await st.start_systemkey()
        h = await st.start_keyserver()
        await wait_unsealed(h)
        store = await h.keystore("three-places")
        for i in range(4):
            value = f"three-places-secret-{i}-" + "x" * i
            key = await h.key(store, "SECRET", f"s{i}", secretValue=value)
            secrets[key["keyId"]] = value
        # a secret with two versions, and a symmetric key whose ciphertext leaves the server
        first = next(iter(secrets))
        st_, out = await h.mgmt("POST", f"/keys/{first}/rotate", json={"secretValue": "second-value"})
        assert st_ == 200, out
        sym = await h.key(store, "SYMMETRIC_KEY", "aes")
        st_, out = await h.client("POST", f"/symmetric-keys/{sym['keyId']}/encrypt", json={"plaintext": PLAINTEXT})
        assert st_ == 200, out
        ciphertext = base64.b64decode(out["body"]["ciphertext"])
        ks_dir, sk_dir = st.ks_cfg.data_path, st.sk_cfg.data_path
    # the key server is stopped: what is on disk is all there is
    every = {p for d in (ks_dir, sk_dir) for p in d.rglob("*") if p.is_file()}
    db = sorted(p for p in every if p.name.startswith("skm.db"))
    rk = sorted(p for p in every if p.is_relative_to(ks_dir) and p not in db)   # root key (+ the host's PKI)
    sk = sorted(p for p in every if p.is_relative_to(sk_dir))
    assert db and ks_dir / "root.key" in rk and sk_dir / "keyring.json" in sk
    assert not _keyrings(db + rk), "the key-server host still holds a keyring"
    expected_values = {*secrets.values(), "second-value"}

    # nothing in the clear anywhere
    for p in every:
        data = p.read_bytes()
        for v in expected_values:
            assert v.encode() not in data, f"{p.name} holds a secret in the clear"

    places = {"db": db, "systemkey": sk, "rootkey": rk}
    for a, b in (("db", "systemkey"), ("db", "rootkey"), ("systemkey", "rootkey")):
        loot = attack(places[a] + places[b], tmp_path / f"scratch-{a}-{b}")
        assert loot.plaintexts == {}, f"{a} + {b} opened sealed records"
        if "rootkey" in (a, b) and "systemkey" in (a, b):
            assert len(loot.system_keys) == 1  # the system key, but no data to use it on
        else:
            assert loot.system_keys == set(), f"{a} + {b} unwrapped a system key"

    # all three: the same attack recovers every secret, every version, and the symmetric key
    loot = attack(db + sk + rk, tmp_path / "scratch-all")
    recovered = {ident: p for ident, p in loot.plaintexts.items() if ident[:2] == ("key_versions", "material_sealed")}
    values = {p.decode(errors="replace") for ident, p in recovered.items() if ident[2] in secrets}
    assert values == expected_values
    material = recovered[("key_versions", "material_sealed", sym["keyId"], 0)]
    assert int.from_bytes(ciphertext[:4], "big") == 0
    assert AESGCM(material).decrypt(ciphertext[4:16], ciphertext[16:], cipher_aad(sym["keyId"], 0)) \
        == PLAINTEXT.encode()
