"""The host's one audit writer (server/audit/host.py), over real Unix sockets and the real database:
another worker's records are committed by worker 0's writer in its chain; when worker 0 cannot be
reached the worker writes them itself; an answer that is lost or an error fails the requests
(fail closed) and the sender never writes them a second time."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.audit import Audit
from server.audit.host import SOCKET_NAME, HostWriter, HostWriterClient
from server.errors import Unavailable


def _rec(i: int) -> dict:
    return {"plane": "system", "actor": "worker-1", "actor_kind": "system", "action": "test.host",
            "result": "ok", "detail": {"n": i}}


class _Worker1(Audit):
    """A second worker's Audit on the same database; counts the batches it writes itself."""
    wrote = 0

    async def _write(self, rows):
        self.wrote += 1
        return await super()._write(rows)


def _worker1(rt, rundir) -> _Worker1:
    a = _Worker1(rt.storage, rt.barrier, rt.audit.settings)
    a.host = HostWriterClient(rundir, timeout=10)
    return a


async def test_another_workers_records_are_written_by_the_host_writer(skm, tmp_path):
    rt = skm.rt
    host = HostWriter(rt.audit, tmp_path)
    await host.start()
    assert (tmp_path / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
    w1 = _worker1(rt, tmp_path)
    try:
        own = [rt.audit.append(_rec(1000 + i)) for i in range(20)]
        theirs = [w1.append(_rec(i)) for i in range(50)]
        seqs = await asyncio.gather(*own, *theirs)
        assert w1.wrote == 0                               # worker 0 wrote all of them
        assert len(set(seqs)) == 70
        mine = seqs[20:]
        assert mine == sorted(mine)                        # a worker's records keep their order
        rows = await rt.storage.fetchall("SELECT seq, detail FROM audit_log WHERE action = 'test.host' "
                                         "ORDER BY seq")
        assert len(rows) == 70
        res = await rt.audit.verify()
        assert res.ok, res
    finally:
        await w1.host.close()
        await host.stop()
    assert not (tmp_path / SOCKET_NAME).exists()


async def test_unreachable_host_writer_means_the_worker_writes_itself(skm, tmp_path):
    rt = skm.rt
    w1 = _worker1(rt, tmp_path)            # nobody listens on tmp_path/audit.sock
    try:
        seqs = await asyncio.gather(*(w1.append(_rec(i)) for i in range(5)))
        assert w1.wrote >= 1 and len(set(seqs)) == 5
        assert (await rt.audit.verify()).ok
    finally:
        await w1.host.close()


class _Failing:
    row_fields = Audit.row_fields

    async def append_rows(self, rows):
        raise Unavailable("the database is unreachable")


async def test_a_failed_commit_on_the_host_fails_the_requests(skm, tmp_path):
    rt = skm.rt
    host = HostWriter(_Failing(), tmp_path)
    await host.start()
    w1 = _worker1(rt, tmp_path)
    before = await rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    try:
        with pytest.raises(Unavailable, match="cannot be written"):
            await w1.append(_rec(1))
        assert w1.wrote == 0                               # not written a second time by the worker
        assert await rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1") == before
    finally:
        await w1.host.close()
        await host.stop()


async def test_an_answer_lost_with_the_host_fails_the_requests(skm, tmp_path):
    """Worker 0 dies after receiving a batch: the records may or may not be written, so their
    requests fail; the worker does not write them again."""
    rt = skm.rt
    got = asyncio.Event()

    async def swallow(reader, writer):
        await reader.read(4)               # the frame arrived ...
        got.set()
        writer.close()                     # ... and its writer went away without an answer

    server = await asyncio.start_unix_server(swallow, path=str(tmp_path / SOCKET_NAME))
    w1 = _worker1(rt, tmp_path)
    try:
        with pytest.raises(Unavailable, match="went away"):
            await w1.append(_rec(1))
        assert got.is_set() and w1.wrote == 0
    finally:
        await w1.host.close()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


async def test_malformed_frames_are_refused(skm, tmp_path):
    rt = skm.rt
    host = HostWriter(rt.audit, tmp_path)
    await host.start()
    before = await rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    client = HostWriterClient(tmp_path, timeout=10)
    try:
        with pytest.raises(Unavailable, match="audit fields"):
            await client.write([{"actor": "x"}])           # not the shape `_row` makes
        assert await rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1") == before
    finally:
        await client.close()
        await host.stop()
