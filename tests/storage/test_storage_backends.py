"""Both storage backends against the same expectations, plus PostgreSQL's replica features."""
from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import pytest

from server.errors import ConfigError, InvalidRequest, Unavailable
from server.keys.context import is_unique_violation  # the key service's check, on both backends
from server.storage.base import Storage
from server.storage.factory import open_storage
from server.storage.migrations import MIGRATIONS, render
from server.storage.postgres import PostgresStorage, lock_key, rowcount, translate_placeholders
from tests.support.postgres import PostgresCluster, pg_cluster, pg_url, storage, storage_url  # noqa: F401

SCRATCH = """CREATE TABLE scratch (
    id {serial_pk},
    name TEXT NOT NULL UNIQUE,
    n INTEGER NOT NULL DEFAULT 0,
    data {blob})"""


async def _scratch(s: Storage) -> None:
    await s.execute(render(SCRATCH, s.dialect))



async def _wait_for(q: asyncio.Queue[str], timeout: float = 5.0) -> str:
    return await asyncio.wait_for(q.get(), timeout)


# -- pure helpers --------------------------------------------------------------

@pytest.mark.parametrize("sql, want", [
    ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = $1 AND b = $2"),
    ("SELECT '?' AS q, ? AS v", "SELECT '?' AS q, $1 AS v"),
    ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1"),
    ("SELECT E'a\\'?', ?", "SELECT E'a\\'?', $1"),
    ('SELECT "col?" FROM t WHERE x = ?', 'SELECT "col?" FROM t WHERE x = $1'),
    ("SELECT ? -- why?\n, ?", "SELECT $1 -- why?\n, $2"),
    ("SELECT /* ? */ ?", "SELECT /* ? */ $1"),
    ("SELECT $$ ? $$, $tag$ '?' $tag$, ?", "SELECT $$ ? $$, $tag$ '?' $tag$, $1"),
    ("SELECT 1", "SELECT 1"),
])
def test_translate_placeholders(sql: str, want: str) -> None:
    assert translate_placeholders(sql) == want


def test_rowcount_and_lock_key() -> None:
    assert rowcount("UPDATE 3") == 3
    assert rowcount("INSERT 0 1") == 1
    assert rowcount("DELETE 0") == 0
    assert rowcount("CREATE TABLE") == 0
    assert lock_key("skm-jobs") == lock_key("skm-jobs")
    assert lock_key("skm-jobs") != lock_key("skm-jobs2")
    assert -(2**63) <= lock_key("skm-jobs") < 2**63


# -- both backends ---------------------------------------------------------------

async def test_migrations_applied_once_and_idempotent(storage_url: str) -> None:
    want = [v for v, _ in MIGRATIONS]
    for _ in range(2):
        s = open_storage(storage_url)
        await s.open()
        try:
            rows = await s.fetchall("SELECT version FROM schema_version ORDER BY version")
            assert [r["version"] for r in rows] == want
            # the schema is really there
            assert await s.fetchval("SELECT COUNT(*) AS c FROM keys") == 0
            assert await s.fetchval("SELECT COUNT(*) AS c FROM auth_certificates") == 0
        finally:
            await s.close()


async def test_a_postgresql_older_than_the_audit_needs_is_refused_at_open(pg_url: str, monkeypatch) -> None:  # noqa: F811
    """The audit's batch statement needs PostgreSQL 12 (`AS MATERIALIZED`): an older server is refused when
    the store opens, with the version it runs and what to do, before anything is created in it (here the
    floor is raised past this machine's server, which is the only PostgreSQL there is to test against)."""
    from server.storage import postgres
    monkeypatch.setattr(postgres, "MIN_SERVER_MAJOR", 99)
    s = open_storage(pg_url)
    with pytest.raises(ConfigError) as e:
        await s.open()
    assert "PostgreSQL 99 or later is needed" in e.value.detail and "upgrade it" in e.value.detail
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()


async def test_insert_returning_and_fetch(storage: Storage) -> None:
    async with storage.transaction() as tx:
        row = await tx.fetchone("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?) RETURNING id",
                                "ak1", "one", "2024-01-01T00:00:00Z")
        assert row is not None and isinstance(row["id"], int)
        pid = row["id"]
        # visible inside its own transaction
        assert await tx.fetchval("SELECT name FROM projects WHERE id = ?", pid) == "one"
    async with storage.transaction() as tx:
        pid2 = await tx.fetchval("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?) RETURNING id",
                                 "ak2", "two", "2024-01-02T00:00:00Z")
    assert pid2 > pid
    one = await storage.fetchone("SELECT id, appkey, name FROM projects WHERE appkey = ?", "ak1")
    assert one == {"id": pid, "appkey": "ak1", "name": "one"}
    assert type(one) is dict
    assert await storage.fetchone("SELECT id FROM projects WHERE appkey = ?", "nope") is None
    assert await storage.fetchval("SELECT id FROM projects WHERE appkey = ?", "nope") is None
    rows = await storage.fetchall("SELECT appkey FROM projects ORDER BY id")
    assert rows == [{"appkey": "ak1"}, {"appkey": "ak2"}]
    assert await storage.fetchall("SELECT appkey FROM projects WHERE id < ?", 0) == []
    # '?' inside literals, identifiers and comments is not a placeholder
    row = await storage.fetchone("SELECT 'a?b' AS \"q?\", ? AS v -- trailing ?\n", "x")
    assert row == {"q?": "a?b", "v": "x"}


async def test_a_nul_in_text_is_a_bad_request_on_postgresql_and_kept_on_sqlite(storage: Storage) -> None:  # noqa: F811
    """PostgreSQL's text cannot hold a NUL: a value with one that reaches a statement is the request's input,
    so it is InvalidRequest (400, saying what to do), not a 500, and nothing is written; SQLite keeps it."""
    await _scratch(storage)
    if storage.dialect == "postgresql":
        with pytest.raises(InvalidRequest) as e:
            await storage.execute("INSERT INTO scratch (name) VALUES (?)", "a\x00b")
        assert e.value.status == 400 and "NUL" in e.value.detail
        async with storage.transaction() as tx:
            await tx.execute("INSERT INTO scratch (name) VALUES (?)", "kept")
        with pytest.raises(InvalidRequest):
            async with storage.transaction() as tx:
                await tx.execute("INSERT INTO scratch (name) VALUES (?)", "rolled back")
                await tx.execute("INSERT INTO scratch (name) VALUES (?)", "\x00")
        assert [r["name"] for r in await storage.fetchall("SELECT name FROM scratch")] == ["kept"]
    else:
        await storage.execute("INSERT INTO scratch (name) VALUES (?)", "a\x00b")
        assert await storage.fetchval("SELECT name FROM scratch") == "a\x00b"


async def test_execute_rowcount(storage: Storage) -> None:
    await _scratch(storage)
    for name in ("a", "b", "c"):
        assert await storage.execute("INSERT INTO scratch (name, n) VALUES (?, ?)", name, 1) == 1
    assert await storage.execute("UPDATE scratch SET n = n + 1 WHERE name IN (?, ?)", "a", "b") == 2
    assert await storage.execute("UPDATE scratch SET n = 0 WHERE name = ?", "zzz") == 0
    async with storage.transaction() as tx:
        assert await tx.execute("UPDATE scratch SET n = 5") == 3
    assert await storage.execute("DELETE FROM scratch WHERE n = ?", 5) == 3
    await storage.executemany("INSERT INTO scratch (name, n) VALUES (?, ?)", [("x", 1), ("y", 2)])
    assert await storage.fetchval("SELECT SUM(n) AS s FROM scratch") == 3


async def test_transaction_rollback_leaves_nothing(storage: Storage) -> None:
    await _scratch(storage)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with storage.transaction() as tx:
            await tx.execute("INSERT INTO scratch (name) VALUES (?)", "ghost")
            await tx.fetchone("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, ?) RETURNING id",
                              "ak", "p", "now")
            raise Boom()
    assert await storage.fetchval("SELECT COUNT(*) AS c FROM scratch") == 0
    assert await storage.fetchval("SELECT COUNT(*) AS c FROM projects") == 0
    # and the store is usable afterwards
    async with storage.transaction() as tx:
        await tx.execute("INSERT INTO scratch (name) VALUES (?)", "real")
    assert await storage.fetchval("SELECT COUNT(*) AS c FROM scratch") == 1


async def test_blob_round_trip(storage: Storage) -> None:
    await _scratch(storage)
    blobs = {
        "all-bytes": bytes(range(256)) * 4,
        "nuls": b"\x00" * 64,
        "nul-edges": b"\x00abc\x00",
        "random": os.urandom(70_000),
        "empty": b"",
    }
    for name, data in blobs.items():
        await storage.execute("INSERT INTO scratch (name, data) VALUES (?, ?)", name, data)
    await storage.execute("INSERT INTO scratch (name, data) VALUES (?, ?)", "none", None)
    for name, data in blobs.items():
        got = await storage.fetchval("SELECT data FROM scratch WHERE name = ?", name)
        assert type(got) is bytes and got == data, name
    assert await storage.fetchval("SELECT data FROM scratch WHERE name = ?", "none") is None
    # a sealed column of the real schema too
    await storage.execute("INSERT INTO projects (appkey, name, created_at) VALUES ('a', 'p', 'now')")
    pid = await storage.fetchval("SELECT id FROM projects")
    await storage.execute("INSERT INTO keystores (project_id, name, created_by, created_at, updated_by, updated_at) "
                          "VALUES (?, 'ks', 'op', 'now', 'op', 'now')", pid)
    ks = await storage.fetchval("SELECT id FROM keystores")
    await storage.execute("INSERT INTO keys (id, keystore_id, name, key_type, key_spec, status, created_by, created_at,"
                          " updated_by, updated_at) VALUES ('k1', ?, 'k', 'SYMMETRIC', 'AES256', 'ACTIVE', 'op', 'now',"
                          " 'op', 'now')", ks)
    await storage.execute("INSERT INTO key_versions (key_id, version, material_sealed, created_at) VALUES (?, ?, ?, ?)",
                          "k1", 0, blobs["nul-edges"], "now")
    assert await storage.fetchval("SELECT material_sealed FROM key_versions WHERE key_id = ?", "k1") == b"\x00abc\x00"


async def test_unique_violation_detectable_by_name(storage: Storage) -> None:
    sql = "INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, 'now') RETURNING id"
    await storage.fetchone(sql, "dup", "first")
    with pytest.raises(Exception) as err:
        async with storage.transaction() as tx:
            await tx.fetchone(sql, "dup", "second")
    assert is_unique_violation(err.value), repr(err.value)
    if storage.dialect == "postgresql":
        assert isinstance(err.value, asyncpg.UniqueViolationError)
        assert "UniqueViolation" in type(err.value).__name__
    with pytest.raises(Exception) as err:
        await storage.execute("INSERT INTO projects (appkey, name, created_at) VALUES (?, ?, 'now')", "other", "first")
    assert is_unique_violation(err.value)
    assert [r["name"] for r in await storage.fetchall("SELECT name FROM projects")] == ["first"]


async def test_concurrent_transactions_all_land(storage: Storage) -> None:
    await _scratch(storage)
    await storage.execute("INSERT INTO scratch (name, n) VALUES ('counter', 0)")

    async def bump(i: int) -> None:
        async with storage.transaction() as tx:
            await tx.execute("UPDATE scratch SET n = n + 1 WHERE name = ?", "counter")
            await tx.execute("INSERT INTO scratch (name, n) VALUES (?, ?)", f"row{i}", i)
            await asyncio.sleep(0)   # let the others in while this one holds its row lock

    async def read() -> Any:
        return await storage.fetchval("SELECT COUNT(*) AS c FROM scratch")

    results = await asyncio.gather(*(bump(i) for i in range(50)), *(read() for _ in range(20)))
    assert all(isinstance(r, int) for r in results[50:])
    assert await storage.fetchval("SELECT n FROM scratch WHERE name = 'counter'") == 50
    assert await storage.fetchval("SELECT COUNT(*) AS c FROM scratch") == 51


async def test_single_process_defaults(tmp_path) -> None:
    # SQLite is single-process: it always leads, and notifications have nowhere to go.
    storage = open_storage(f"sqlite:///{tmp_path / 'single.db'}")
    await storage.open()
    assert await storage.try_lock("skm-jobs") is True
    await storage.unlock("skm-jobs")
    await storage.listen("skm_events", lambda p: None)
    await storage.notify("skm_events", "x")
    await storage.close()


# -- PostgreSQL only -------------------------------------------------------------

async def _opened(url: str, **kw: Any) -> PostgresStorage:
    s = PostgresStorage(url, **kw)
    await s.open()
    return s


async def test_open_storage_routes_postgres(pg_url: str) -> None:
    s = open_storage(pg_url + "?pool_max_size=3")
    assert isinstance(s, PostgresStorage) and s.dialect == "postgresql"
    await s.open()
    try:
        assert s._pool is not None and s._pool.get_max_size() == 3
        assert await s.fetchval("SELECT 1 AS one") == 1
    finally:
        await s.close()


async def test_a_pooled_statement_is_one_round_trip(pg_url: str) -> None:
    """Handing a connection back to the pool sends nothing (asyncpg's default sends a reset query: one
    more round trip for every statement, the audit's included); a transaction left open is still
    rolled back."""
    s = await _opened(pg_url, max_size=1)          # one connection: every statement below uses it
    try:
        seen: list[str] = []
        async with s._acquire() as conn:
            conn.add_query_logger(lambda rec: seen.append(rec.query))
        for _ in range(3):
            assert await s.fetchval("SELECT 1 AS one") == 1
        assert seen == ["SELECT 1 AS one"] * 3
        async with s._acquire() as conn:
            await conn.execute("BEGIN")                # left open on purpose
        assert seen[3:] == ["BEGIN", "ROLLBACK"]
        assert await s.fetchval("SELECT 1 AS one") == 1
    finally:
        await s.close()


async def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    replicas = [PostgresStorage(pg_url, max_size=2) for _ in range(6)]
    await asyncio.gather(*(r.open() for r in replicas))
    try:
        rows = await replicas[0].fetchall("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == [v for v, _ in MIGRATIONS]
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


async def test_try_lock_exclusive_and_released_on_close(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        assert await a.try_lock("skm-jobs") is True
        assert await b.try_lock("skm-jobs") is False
        assert await a.try_lock("skm-jobs") is True      # asking again keeps it, does not stack it
        assert await b.try_lock("other-job") is True     # names are independent
        await a.unlock("skm-jobs")                        # one unlock releases it
        assert await b.try_lock("skm-jobs") is True
        assert await a.try_lock("skm-jobs") is False
        await b.close()                                   # the holder goes away
        assert await a.try_lock("skm-jobs") is True
        assert await a.try_lock("other-job") is True
    finally:
        await a.close()
        await b.close()


async def test_lock_taken_over_when_holder_connection_dies(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        assert await a.try_lock("skm-jobs") is True
        assert await b.try_lock("skm-jobs") is False
        holder_pid = a._lock_conn.get_server_pid()       # type: ignore[union-attr]
        assert await b.fetchval("SELECT pg_terminate_backend(?) AS t", holder_pid) is True
        for _ in range(100):
            if await b.try_lock("skm-jobs"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the lock was not released when its holder's connection died")
        assert await a.try_lock("skm-jobs") is False      # a noticed it lost leadership
        await b.unlock("skm-jobs")
        assert await a.try_lock("skm-jobs") is True       # and can lead again on a new connection
    finally:
        await a.close()
        await b.close()


async def test_listen_notify_between_instances(pg_url: str) -> None:
    a, b = await _opened(pg_url), await _opened(pg_url)
    try:
        got: asyncio.Queue[str] = asyncio.Queue()
        got_async: asyncio.Queue[str] = asyncio.Queue()

        async def on_async(payload: str) -> None:
            await got_async.put(payload)

        await a.listen("skm_events", got.put_nowait)
        await a.listen("skm_events", on_async)
        await b.notify("skm_events", '{"kind":"key_rotated","note":"é ?"}')
        assert await _wait_for(got) == '{"kind":"key_rotated","note":"é ?"}'
        assert await _wait_for(got_async) == '{"kind":"key_rotated","note":"é ?"}'
        await b.notify("other_channel", "nope")
        await a.notify("skm_events", "self")               # the sender hears itself too
        assert await _wait_for(got) == "self"
        assert got.empty()
    finally:
        await a.close()
        await b.close()


async def test_survives_postgres_restart(pg_cluster: PostgresCluster) -> None:
    with pg_cluster.database() as url:
        a, b = await _opened(url), await _opened(url)
        try:
            got: asyncio.Queue[str] = asyncio.Queue()
            await a.listen("skm_events", got.put_nowait)
            assert await a.try_lock("skm-jobs") is True
            await pg_cluster.stop_async()
            try:
                # A clean 503 error, none of the driver's own exceptions (or their text).
                with pytest.raises(Unavailable) as err:
                    await b.fetchval("SELECT 1 AS one")
                assert err.value.status == 503 and err.value.__cause__ is None
                with pytest.raises(Unavailable):
                    async with b.transaction() as tx:
                        await tx.execute("SELECT 1")
            finally:
                await pg_cluster.start_async()
            # pooled connections the server closed are replaced on next use
            assert await b.fetchval("SELECT 1 AS one") == 1
            assert await a.fetchval("SELECT 1 AS one") == 1
            # the listener reconnects by itself
            for i in range(100):
                await b.notify("skm_events", f"after-restart-{i}")
                try:
                    payload = await asyncio.wait_for(got.get(), 0.1)
                    break
                except asyncio.TimeoutError:
                    continue
            else:
                pytest.fail("LISTEN did not come back after the restart")
            assert payload.startswith("after-restart-")
            # the session lock died with the server; leadership is taken afresh
            assert await b.try_lock("skm-jobs") is True
            assert await a.try_lock("skm-jobs") is False
        finally:
            await a.close()
            await b.close()


async def test_a_file_that_is_not_a_database_is_refused_and_leaves_no_thread(tmp_path) -> None:
    """Opening a damaged file fails with SQLite's error, the file is left as it was, and no connection
    thread is left behind (one used to hold the process open at exit)."""
    import threading
    from server.storage.sqlite import SQLiteStorage
    path = tmp_path / "skm.db"
    junk = b"this is not a database" * 200
    path.write_bytes(junk)
    before = threading.active_count()
    st = SQLiteStorage(str(path))
    with pytest.raises(ConfigError, match="not a usable SQLite database.*skm backup restore"):
        await st.open()
    await st.close()
    deadline = asyncio.get_running_loop().time() + 5
    while threading.active_count() > before and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert threading.active_count() == before
    assert path.read_bytes() == junk
