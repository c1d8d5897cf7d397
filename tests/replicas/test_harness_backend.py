"""`make test-postgres` really moves the `skm` harness onto PostgreSQL (SKM_TEST_STORAGE)."""
from __future__ import annotations

from tests.support.server import harness_backend


async def test_the_skm_fixture_runs_on_the_backend_asked_for(skm):
    assert skm.rt.storage.dialect == harness_backend()
    store = await skm.keystore("backend-check")
    key = await skm.key(store, "SECRET", "s", secretValue="v")
    rows = await skm.rt.storage.fetchall("SELECT id FROM keys WHERE id = ?", key["keyId"])
    assert len(rows) == 1


async def test_the_skm_fixture_restores_its_store_when_asked(skm):
    """SKM_TEST_RESTORED=1: the store came from a SQLite backup restored into PostgreSQL (tests/backup)."""
    from tests.support.server import harness_restored
    backup = skm.tmp / "harness.skmbak"
    assert backup.exists() == harness_restored()
    if harness_restored():
        assert not list((skm.tmp / "data").glob("skm.db*"))
        assert skm.rt.storage.dialect == "postgresql"
