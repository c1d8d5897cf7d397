"""Migration 7 on a database that already holds operators and change requests (both backends):
roles become global grants, pending requests keep their requester, keystore_id becomes optional."""
from __future__ import annotations

import pytest

from server.storage.base import Storage
from server.storage.factory import open_storage
from server.storage.migrations import MIGRATIONS
from tests.support.postgres import storage_url  # noqa: F401

T = "2026-01-01T00:00:00.000000Z"


async def test_migration_7_keeps_operators_requests_and_approvals(storage_url: str,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before = [m for m in MIGRATIONS if m[0] < 7]
    monkeypatch.setattr(Storage, "migrations", before)       # what open() applies
    s = open_storage(storage_url)
    await s.open()
    try:
        await s.execute("INSERT INTO projects (appkey, name, created_at) VALUES ('k', 'p', ?)", T)
        await s.execute("INSERT INTO keystores (project_id, name, created_by, created_at, updated_by, updated_at) "
                        "VALUES (1, 's', 'admin', ?, 'admin', ?)", T, T)
        for name, role in (("admin", "admin"), ("ann", "approver")):
            await s.execute("INSERT INTO operators (name, role, created_at) VALUES (?, ?, ?)", name, role, T)
        for who in ("admin", "uak:ABC@admin"):
            await s.execute("INSERT INTO change_requests (keystore_id, op, params, diff, requested_by, created_at, "
                            "updated_at, expires_at, secrets_sealed) VALUES (1, 'key.create', '{}', '{}', ?, ?, ?, ?, "
                            "?)", who, T, T, T, b"\x00sealed")
        await s.execute("INSERT INTO change_approvals (request_id, operator, created_at) VALUES (1, 'ann', ?)", T)
    finally:
        await s.close()
    monkeypatch.undo()
    s = open_storage(storage_url)
    await s.open()
    try:
        assert [r["version"] for r in await s.fetchall("SELECT version FROM schema_version ORDER BY version")] == \
            [v for v, _ in MIGRATIONS]
        grants = await s.fetchall("SELECT o.name, g.role, g.project_id, g.granted_by_id, g.granted_at FROM "
                                  "operator_roles g JOIN operators o ON o.id = g.operator_id ORDER BY o.name")
        assert grants == [{"name": "admin", "role": "admin", "project_id": None, "granted_by_id": None,
                           "granted_at": T},
                          {"name": "ann", "role": "approver", "project_id": None, "granted_by_id": None,
                           "granted_at": T}]
        rows = await s.fetchall("SELECT id, keystore_id, project_id, requester_id, requested_by, secrets_sealed "
                                "FROM change_requests ORDER BY id")
        assert [(r["id"], r["keystore_id"], r["project_id"], r["requester_id"]) for r in rows] == \
            [(1, 1, 1, 1), (2, 1, 1, None)]        # the access-key one is resolved when it is decided
        assert bytes(rows[0]["secrets_sealed"]) == b"\x00sealed"
        assert await s.fetchall("SELECT request_id, operator, operator_id FROM change_approvals") == \
            [{"request_id": 1, "operator": "ann", "operator_id": 2}]
        # Operator management requests have no key store; new ids continue after the old ones.
        row = await s.fetchone("INSERT INTO change_requests (op, params, diff, requested_by, created_at, updated_at, "
                               "expires_at) VALUES ('operator.create', '{}', '{}', 'admin', ?, ?, ?) RETURNING id",
                               T, T, T)
        assert row["id"] == 3
        with pytest.raises(Exception):       # the approvals still point at real requests
            await s.execute("INSERT INTO change_approvals (request_id, operator, created_at) VALUES (99, 'x', ?)", T)
    finally:
        await s.close()


async def test_a_lower_migration_merged_later_still_runs(storage_url: str,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Branches take numbers in parallel: a database that has 7 but not 6 gets 6 when it appears."""
    without = [m for m in MIGRATIONS if m[0] != 5]
    monkeypatch.setattr(Storage, "migrations", without)
    s = open_storage(storage_url)
    await s.open()
    await s.close()
    monkeypatch.undo()
    s = open_storage(storage_url)
    await s.open()
    try:
        versions = [r["version"] for r in await s.fetchall("SELECT version FROM schema_version ORDER BY version")]
        assert versions == sorted(v for v, _ in MIGRATIONS)
        assert 5 in versions
    finally:
        await s.close()
