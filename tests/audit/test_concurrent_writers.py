"""Several processes' audit writers on one store (workers, replicas) keep ONE chain on both backends.

Every worker group-commits its own records: on SQLite taking turns through the writer lock, on
PostgreSQL writing after the head it last saw in one statement that writes nothing, and answers the
head it found, when the head has moved (server/audit/log.py). What a user relies on: every
acknowledged record is in the log once, numbered without a gap, and the keyed chain verifies."""
from __future__ import annotations

import asyncio
import os

import pytest

from server.audit import Audit, verify_chain
from server.audit import log as audit_log
from server.barrier.barrier import Barrier
from server.metrics import Metrics
from server.settings import AuditSettings
from server.storage.factory import open_storage
from tests.support.postgres import pg_url, storage_url  # noqa: F401


def rec(who: str, i: int) -> dict:
    return {"plane": "system", "actor": who, "actor_kind": "system", "action": "test.write", "result": "ok",
            "detail": {"i": i}}


@pytest.fixture
async def writers(storage_url: str):  # noqa: F811
    """Two writers as two processes would have them: a storage (connections) and an Audit each."""
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    stores = []
    for _ in range(2):
        s = open_storage(storage_url)
        await s.open()
        stores.append(s)
    audits = [Audit(s, barrier, AuditSettings(batch_max=16)) for s in stores]
    await audits[0].append(rec("setup", 0))          # makes the audit key both then read
    yield stores, audits
    for s in stores:
        await s.close()


async def check_chain(storage, audit: Audit, expected: int) -> None:
    seqs = [r["seq"] for r in await storage.fetchall("SELECT seq FROM audit_log ORDER BY seq")]
    assert seqs == list(range(1, expected + 1)), "records missing, repeated or out of sequence"
    res = await verify_chain(storage, key=await audit.link_key())
    assert res.ok and res.keyed and res.head_seq == expected, res


async def test_two_writers_at_once_keep_one_chain(writers):
    stores, audits = writers

    async def burst(a: Audit, who: str) -> list[int]:
        seqs: list[int] = []
        for b in range(12):      # batches of different sizes, interleaved with the other writer's
            seqs += await asyncio.gather(*(a.append(rec(who, b * 100 + i)) for i in range(1 + b % 5 * 7)))
        return seqs
    got = await asyncio.gather(burst(audits[0], "w0"), burst(audits[1], "w1"))
    every = got[0] + got[1]
    assert len(set(every)) == len(every), "two records were given the same number"
    await check_chain(stores[0], audits[0], 1 + len(every))
    # Each writer's records are where it was told they are.
    for who, seqs in (("w0", got[0]), ("w1", got[1])):
        rows = await stores[1].fetchall("SELECT seq FROM audit_log WHERE actor = ? ORDER BY seq", who)
        assert [r["seq"] for r in rows] == sorted(seqs)


async def test_a_writer_whose_view_of_the_head_is_old_chains_after_the_new_head(writers):
    stores, audits = writers
    a, b = audits
    await a.append(rec("a", 1))            # a now knows the head (PostgreSQL: remembers it)
    await b.append_many([rec("b", i) for i in range(5)])     # ... which b then moves
    seq = await a.append(rec("a", 2))
    assert seq == 8
    await check_chain(stores[0], a, 8)


async def test_a_moved_head_costs_one_more_statement_not_an_error_and_a_read(pg_url: str):  # noqa: F811
    """PostgreSQL: the refused write answers the head it found, so the retry needs no read of its own
    (SQLite's writers take turns on a lock instead: there is no refused write)."""
    from server.storage.postgres import PostgresStorage
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    stores = [PostgresStorage(pg_url, max_size=1) for _ in range(2)]    # one connection each: all seen
    for st in stores:
        await st.open()
    try:
        a, b = (Audit(st, barrier) for st in stores)
        a.metrics = Metrics()
        await a.append(rec("a", 1))
        await b.append(rec("b", 1))            # a's view of the head is now old
        sent: list[str] = []
        async with stores[0]._acquire() as conn:
            conn.add_query_logger(lambda r: sent.append(r.query))
        assert await a.append(rec("a", 2)) == 3
        assert len([q for q in sent if "audit_log" in q]) == 2
        assert not [q for q in sent if "audit_log" not in q]    # no read of the head, no reset, no lock
        assert a.metrics.registry.get_sample_value("skm_audit_head_moved_total") == 1   # seen in /metrics
        await check_chain(stores[0], a, 3)
    finally:
        for st in stores:
            await st.close()


async def test_when_the_head_keeps_moving_the_writer_locks_it(writers, monkeypatch):
    """PostgreSQL: after OPTIMISTIC_TRIES writes refused for a moved head, the head's row lock is taken
    (the same path as a fresh writer on SQLite's lock): the records still land, chained."""
    stores, audits = writers
    monkeypatch.setattr(audit_log, "OPTIMISTIC_TRIES", 0)
    seqs = await audits[1].append_many([rec("locked", i) for i in range(3)])
    assert seqs == [2, 3, 4]
    monkeypatch.undo()
    await audits[0].append(rec("after", 0))
    await check_chain(stores[0], audits[0], 5)


async def _pg_writers(pg_url: str, tip_path) -> tuple[list, list[Audit]]:  # noqa: F811
    """Two PostgreSQL writers as two workers of one host have them: a storage each, one tip file."""
    from server.audit.tip import SharedTip
    from server.storage.postgres import PostgresStorage
    barrier = Barrier()
    barrier.unseal({1: os.urandom(32)}, 1)
    stores = [PostgresStorage(pg_url, max_size=2) for _ in range(2)]
    for st in stores:
        await st.open()
    audits = [Audit(st, barrier) for st in stores]
    for a in audits:
        a.metrics, a.tip = Metrics(), SharedTip(tip_path)      # each maps the file, as each worker does
    await audits[0].append(rec("setup", 0))
    return stores, audits


def _moved(a: Audit) -> float:
    return a.metrics.registry.get_sample_value("skm_audit_head_moved_total")


async def test_a_batch_chained_after_one_still_being_written_waits_for_it(pg_url: str, tmp_path):  # noqa: F811
    """Workers of one host chain after their shared tip, the end of the last batch any of them sent. A
    batch chained after one that PostgreSQL has not committed yet waits for it and lands right after it:
    no statement is refused (with the head's check in the statement's WHERE, PostgreSQL refused it at
    once, testing the head as it was when the statement began)."""
    import asyncpg
    stores, (a, b) = await _pg_writers(pg_url, tmp_path / "audit-tip")
    holder = await asyncpg.connect(pg_url)
    watcher = await asyncpg.connect(pg_url)
    try:
        async def waiting(n: int) -> None:          # n audit statements queued on the head's row lock
            for _ in range(500):
                got = await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                             "'Lock' AND query LIKE '%INSERT INTO audit_log%'")
                if got >= n:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{n} audit statement(s) never waited on the head's lock")

        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")   # the head held
        first = asyncio.create_task(a.append_many([rec("a", i) for i in range(3)]))
        await waiting(1)
        with a.tip:
            assert a.tip.get()["seq"] == 4          # a's batch (records 2-4) is the tip while on its way
        second = asyncio.create_task(b.append_many([rec("b", i) for i in range(2)]))
        await waiting(2)
        await tx.rollback()
        assert await first == [2, 3, 4]
        assert await second == [5, 6]
        assert _moved(a) == 0 and _moved(b) == 0, "a statement was refused"
        await check_chain(stores[0], a, 6)
    finally:
        await holder.close()
        await watcher.close()
        for st, au in zip(stores, (a, b)):
            await st.close()
            au.tip.close()


async def test_a_wrong_tip_costs_refused_statements_never_the_chain(pg_url: str, tmp_path):  # noqa: F811
    """The tip is a hint (a worker killed with its batch on the way leaves one that never lands): a batch
    chained after it is refused, sent again while the head could still reach it, then chained after the
    head PostgreSQL answered. The records land where they belong and the tip is mended."""
    stores, (a, b) = await _pg_writers(pg_url, tmp_path / "audit-tip")
    try:
        with a.tip:
            a.tip.set(50, "ab" * 32)                # a batch ending at record 50 that was never written
        assert await b.append(rec("b", 1)) == 2
        assert _moved(b) == 1 + audit_log.RESENDS
        last = await stores[0].fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
        with b.tip:
            assert b.tip.get() == {"seq": 2, "hash": last["hash"]}
        assert await a.append(rec("a", 1)) == 3       # a, which had written record 1, chains after the tip
        assert _moved(a) == 0
        await check_chain(stores[0], a, 3)
    finally:
        for st, au in zip(stores, (a, b)):
            await st.close()
            au.tip.close()
