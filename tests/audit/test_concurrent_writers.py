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
