"""System-key rotation: online rewrap of every sealed record while a writer and a reader run."""
from __future__ import annotations

import asyncio
import os
import random
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest

from server.barrier.barrier import Barrier, sealed_aad
from server.barrier.rewrap import count_by_version, rewrap
from server.errors import BarrierError, Sealed
from server.storage.sqlite import SQLiteStorage

NOW = "2026-01-01T00:00:00Z"


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    s = SQLiteStorage(str(tmp_path / "skm.db"))
    await s.open()
    try:
        await s.execute("INSERT INTO projects (id, appkey, name, created_at) VALUES (1, 'appkey', 'p', ?)", NOW)
        await s.execute("INSERT INTO keystores (id, project_id, name, created_by, created_at, updated_by, updated_at)"
                        " VALUES (1, 1, 'ks', 't', ?, 't', ?)", NOW, NOW)
        yield s
    finally:
        await s.close()


@pytest.fixture
def barrier() -> Barrier:
    b = Barrier()
    b.unseal({1: os.urandom(32)}, 1)
    return b


def material(key_id: str, version: int) -> bytes:
    return f"{key_id}:{version}:".encode() + os.urandom(16)


async def insert_keys(storage: SQLiteStorage, barrier: Barrier, n_keys: int, versions: int,
                      expected: dict[tuple[str, int], bytes]) -> None:
    async with storage.transaction() as tx:
        for _ in range(n_keys):
            key_id = uuid.uuid4().hex
            await tx.execute(
                "INSERT INTO keys (id, keystore_id, name, key_type, key_spec, status, current_version, created_by,"
                " created_at, updated_by, updated_at) VALUES (?, 1, ?, 'SYMMETRIC_KEY', 'AES-256', 'ACTIVE', ?,"
                " 't', ?, 't', ?)", key_id, key_id, versions - 1, NOW, NOW)
            for v in range(versions):
                m = material(key_id, v)
                await tx.execute(
                    "INSERT INTO key_versions (key_id, version, material_sealed, created_at) VALUES (?, ?, ?, ?)",
                    key_id, v, barrier.seal(m, sealed_aad("key_versions", "material_sealed", key_id, v)), NOW)
                expected[(key_id, v)] = m


async def insert_certs(storage: SQLiteStorage, barrier: Barrier, n: int, expected: dict) -> None:
    async with storage.transaction() as tx:
        for i in range(1, n + 1):
            pw, bundle = os.urandom(12), os.urandom(200)
            await tx.execute(
                "INSERT INTO auth_certificates (id, keystore_id, name, fingerprint, serial, expires_at,"
                " password_sealed, bundle_sealed, created_by, created_at, updated_by, updated_at)"
                " VALUES (?, 1, ?, ?, '1', ?, ?, ?, 't', ?, 't', ?)",
                i, f"c{i}", uuid.uuid4().hex, NOW, barrier.seal(pw, sealed_aad("auth_certificates", "password_sealed", i)),
                barrier.seal(bundle, sealed_aad("auth_certificates", "bundle_sealed", i)), NOW, NOW)
            expected[("cert-pw", i)] = pw
            expected[("cert-bundle", i)] = bundle


async def check_all(storage: SQLiteStorage, barrier: Barrier, expected: dict) -> None:
    for r in await storage.fetchall("SELECT key_id, version, material_sealed FROM key_versions"):
        k = (r["key_id"], r["version"])
        assert barrier.open(bytes(r["material_sealed"]), sealed_aad("key_versions", "material_sealed", *k)) == expected[k]
    for r in await storage.fetchall("SELECT id, password_sealed, bundle_sealed FROM auth_certificates"):
        pw_aad = sealed_aad("auth_certificates", "password_sealed", r["id"])
        bundle_aad = sealed_aad("auth_certificates", "bundle_sealed", r["id"])
        assert barrier.open(bytes(r["password_sealed"]), pw_aad) == expected[("cert-pw", r["id"])]
        assert barrier.open(bytes(r["bundle_sealed"]), bundle_aad) == expected[("cert-bundle", r["id"])]
    n_kv = await storage.fetchval("SELECT COUNT(*) FROM key_versions")
    n_c = await storage.fetchval("SELECT COUNT(*) FROM auth_certificates")
    assert len(expected) == n_kv + 2 * n_c


async def test_rewrap_under_load_moves_everything_to_the_new_version(storage: SQLiteStorage, barrier: Barrier):
    expected: dict = {}
    await insert_keys(storage, barrier, 400, 8, expected)  # 3200 key versions on v1
    await insert_certs(storage, barrier, 25, expected)      # + 50 sealed certificate columns
    assert await count_by_version(storage) == {1: 3250}

    barrier.add_version(2, os.urandom(32))  # `skm systemkey rotate` picked up: new writes on v2
    done_flag = asyncio.Event()
    errors: list[BaseException] = []
    reads = writes = 0
    originals = [k for k in expected if isinstance(k[0], str) and not k[0].startswith("cert")]

    async def writer() -> None:
        nonlocal writes
        try:
            while not done_flag.is_set():
                await insert_keys(storage, barrier, 2, 3, expected)  # new rows
                key_id, v = random.choice(originals)                # overwrite an old one (CAS must keep it)
                m = material(key_id, v)
                async with storage.transaction() as tx:
                    await tx.execute("UPDATE key_versions SET material_sealed = ? WHERE key_id = ? AND version = ?",
                                     barrier.seal(m, sealed_aad("key_versions", "material_sealed", key_id, v)), key_id, v)
                expected[(key_id, v)] = m
                writes += 1
                await asyncio.sleep(0.002)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    async def reader() -> None:
        nonlocal reads
        try:
            while not done_flag.is_set():
                key_id, v = random.choice(originals)
                r = await storage.fetchone(
                    "SELECT material_sealed FROM key_versions WHERE key_id = ? AND version = ?", key_id, v)
                plain = barrier.open(bytes(r["material_sealed"]), sealed_aad("key_versions", "material_sealed", key_id, v))
                assert plain.startswith(f"{key_id}:{v}:".encode())
                reads += 1
                await asyncio.sleep(0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    calls: list[tuple[int, int]] = []
    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader()), asyncio.create_task(reader())]
    try:
        n = await rewrap(storage, barrier, batch=200, progress=lambda d, t: calls.append((d, t)))
    finally:
        done_flag.set()
        await asyncio.gather(*tasks)
    assert not errors, errors
    assert writes > 0 and reads > 0
    assert 3250 - writes <= n <= 3250
    assert calls[0] == (0, 3250) and calls[-1][0] == n
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) >= 3250 // 200

    counts = await count_by_version(storage)
    assert list(counts) == [2]
    await check_all(storage, barrier, expected)
    barrier.retire(1)  # nothing uses v1 any more
    await check_all(storage, barrier, expected)
    assert await rewrap(storage, barrier) == 0


async def test_small_batches_walk_composite_keys(storage: SQLiteStorage, barrier: Barrier):
    expected: dict = {}
    await insert_keys(storage, barrier, 5, 7, expected)
    await insert_certs(storage, barrier, 3, expected)
    barrier.add_version(2, os.urandom(32))
    assert await rewrap(storage, barrier, batch=4) == 35 + 6
    assert await count_by_version(storage) == {2: 41}
    await check_all(storage, barrier, expected)


async def test_async_progress_and_empty_store(storage: SQLiteStorage, barrier: Barrier):
    assert await count_by_version(storage) == {}
    seen = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))
    assert await rewrap(storage, barrier, progress=progress) == 0
    assert seen[0] == (0, 0)


async def test_sealed_barrier_and_a_bad_record_stop_the_rewrap(storage: SQLiteStorage, barrier: Barrier):
    expected: dict = {}
    await insert_keys(storage, barrier, 1, 2, expected)
    (key_id, _), = [k for k in expected if k[1] == 0]
    # a blob moved to another row no longer opens: rewrap refuses, naming the record
    blob = await storage.fetchval("SELECT material_sealed FROM key_versions WHERE key_id = ? AND version = 0", key_id)
    await storage.execute("UPDATE key_versions SET material_sealed = ? WHERE key_id = ? AND version = 1", blob, key_id)
    barrier.add_version(2, os.urandom(32))
    with pytest.raises(BarrierError, match=f"key_versions.material_sealed record \\({key_id}, 1\\)"):
        await rewrap(storage, barrier)
    barrier.seal_now("test")
    with pytest.raises(Sealed):
        await rewrap(storage, barrier)
