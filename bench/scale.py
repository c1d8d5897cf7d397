"""Scale: secret read and paged key listing with a store of N keys (default 100,000) vs 1,000.

Both data dirs are filled in bulk before their servers start (multi-row INSERTs through the
Storage interface, every secret sealed by the barrier exactly as KeyService seals it), both
servers then run side by side and are measured interleaved like every other workload.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from server import timeutil
from server.barrier.barrier import sealed_aad

ROWS_PER_STATEMENT = 100
KEY_COLS = ("id, keystore_id, name, description, key_type, key_spec, status, exportable, imported, "
            "auto_rotation_days, next_rotation_at, current_version, created_by, created_at, updated_by, "
            "updated_at, seal")
VERSION_COLS = "key_id, version, status, material_sealed, public_der, created_at, seal"


async def bulk_secrets(rt, keystore_id: int, count: int, *, label: str = "keys", quiet: bool = False) -> None:
    """Insert `count` SECRET keys (version 0, 32-byte values) into key store `keystore_id`."""
    now = timeutil.now_db()
    progress = Progress(TextColumn(f"[bold]creating {label}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), disable=quiet, transient=False)
    with progress:
        task = progress.add_task(label, total=count)
        done = 0
        while done < count:
            n = min(ROWS_PER_STATEMENT * 10, count - done)
            async with rt.storage.transaction() as tx:
                for start in range(0, n, ROWS_PER_STATEMENT):
                    m = min(ROWS_PER_STATEMENT, n - start)
                    key_args: list = []
                    ver_args: list = []
                    for i in range(m):
                        kid = uuid.uuid4().hex
                        seq = done + start + i
                        # Sealed as the key server seals them (server/access/seal.py), or no client could read them.
                        seal = await rt.access_seal.mac("keys", {
                            "id": kid, "keystore_id": keystore_id, "key_type": "SECRET", "key_spec": "SECRET",
                            "status": "ACTIVE", "exportable": 0, "current_version": 0})
                        key_args += [kid, keystore_id, f"bulk-{seq:07d}", "", "SECRET", "SECRET", "ACTIVE", 0, 0, 0,
                                     None, 0, "bench", now, "bench", now, seal]
                        sealed = rt.barrier.seal(os.urandom(16).hex().encode(),
                                                 sealed_aad("key_versions", "material_sealed", kid, 0))
                        ver_args += [kid, 0, "ACTIVE", sealed, None, now,
                                     await rt.access_seal.mac("key_versions", {"key_id": kid, "version": 0,
                                                                               "status": "ACTIVE"})]
                    await tx.execute(f"INSERT INTO keys ({KEY_COLS}) VALUES "
                                     + ", ".join(["(" + ", ".join("?" * 17) + ")"] * m), *key_args)
                    await tx.execute(f"INSERT INTO key_versions ({VERSION_COLS}) VALUES "
                                     + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * m), *ver_args)
            done += n
            progress.update(task, completed=done)


def list_path(keystore_id: int, page: int, size: int = 100) -> str:
    return f"/keystores/{keystore_id}/keys?detail=true&pageNumber={page}&pageSize={size}"


def workloads(keys_total: int, keystore_id: int, secret_id: str) -> dict[str, str]:
    """Client-API paths measured at each size: secret read, first page, a page half-way through."""
    middle = max(1, keys_total // 100 // 2)
    return {"scale-secret-read": f"/secrets/{secret_id}",
            "scale-list-first-page": list_path(keystore_id, 1),
            "scale-list-middle-page": list_path(keystore_id, middle)}


def data_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.db*") if f.is_file())
