"""A clean stop never loses a read record: batches the background shipper had in flight when the
sidecar stopped are shipped by the stop or spooled, and the next run ships them from the spool."""
from __future__ import annotations

import asyncio
import json
import os
import time

from sidecar.metrics import SidecarMetrics
from sidecar.reads import ReadLog, Ref
from sidecar.settings import ListenConfig, ReadsConfig, SidecarConfig

N = 10


class _Answer:
    status, server_error = 200, False

    def __init__(self, accepted: int) -> None:
        self.body = json.dumps({"body": {"accepted": accepted, "refused": []}}).encode()


class HeldUpstream:
    """An upstream whose POSTs stay in flight until released: a key server that took the request and has
    not answered yet when the sidecar is told to stop."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.received: list[dict] = []

    async def request(self, method, version, suffix, *, body, content_type):
        self.started.set()
        await self.release.wait()
        batch = json.loads(body)
        self.received.append(batch)
        return _Answer(len(batch["reads"]))


async def test_reads_in_flight_at_a_clean_stop_are_spooled_and_shipped_by_the_next_run(tmp_path):
    cfg = SidecarConfig(listen=ListenConfig(socket=str(tmp_path / "s.sock")),
                        reads=ReadsConfig(flush_interval=0.05))
    key = os.urandom(32)
    first = HeldUpstream()
    log = ReadLog(cfg, first, SidecarMetrics(), key=key)
    await log.start()
    now = time.time()
    for i in range(N):
        log.pending.append((None, Ref("a" * 32, 0, "secret"), "cache", now + i))
    await asyncio.wait_for(first.started.wait(), 10)   # the background shipper is now POSTing those reads
    await log.stop()                                    # never answered: the stop gives up and spools
    assert first.received == []
    assert log.spool.records == N, log.status()
    assert log.dropped == 0 and log.unreadable == 0

    second = HeldUpstream()
    second.release.set()
    again = ReadLog(cfg, second, SidecarMetrics(), key=key)
    await again.start()
    try:
        again.wake()
        deadline = time.monotonic() + 10
        while again.shipped < N:
            assert time.monotonic() < deadline, again.status()
            await asyncio.sleep(0.02)
    finally:
        await again.stop()
    reads = [r for b in second.received for r in b["reads"]]
    assert sorted(r["readAt"] for r in reads) == [round(now + i, 6) for i in range(N)]
    assert again.spool.records == 0 and not again.spool.path.exists()


def test_a_flood_keeps_detail_max_reads_and_counts_the_rest(tmp_path):
    """Past detail_max reads in an interval only counts are kept (memory stays bounded at any rate), and
    the interval's records are exactly what keeping every read would have given: one per caller, key and
    source with its count, first and last time."""
    cfg = SidecarConfig(listen=ListenConfig(socket=str(tmp_path / "s.sock")),
                        reads=ReadsConfig(detail_max=5, batch_max=1000))
    log = ReadLog(cfg, HeldUpstream(), SidecarMetrics(), key=os.urandom(32))
    a, b = Ref("a" * 32, 1, "secret"), Ref("b" * 32, 2, "secret")
    reads = [("app-1", a if i % 3 else b, "cache", 1000.0 + i) for i in range(50)]
    for r in reads:
        log.note(r)
    assert len(log.pending) == 5 and sum(log._over.values()) == 45 and log.status()["pending"] == 50
    (batch,) = log._take()
    got = {(r["keyId"], r["count"], r["readAt"], r["lastReadAt"]) for r in batch.reads}
    assert got == {("a" * 32, 33, 1000.0, 1049.0), ("b" * 32, 17, 1000.0, 1049.0)}
    assert log.pending == [] and log._over == {}
    # Under the cap: one record per read, as before.
    for r in reads[:4]:
        log.note(r)
    (batch,) = log._take()
    assert [r["readAt"] for r in batch.reads] == [1000.0, 1001.0, 1002.0, 1003.0]
    assert all("count" not in r for r in batch.reads)
