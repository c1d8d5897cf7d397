"""Scheduled backups: `[backup] dir, interval, keep`, /metrics, the /healthz warning, one replica."""
from __future__ import annotations

import asyncio
import contextlib
import re
import time

import pytest

from server.backup.keys import unsealed_barrier
from server.backup.restore import verify_file
from server.backup.schedule import STATE, ScheduleState, backups_in
from server.settings import BackupSettings
from tests.support.postgres import session_cluster
from tests.support.server import start_harness


async def until(cond, what: str, timeout: float = 30.0):
    """Poll `cond` (sync or async) until it is truthy, within a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _get(h, path: str) -> tuple[int, str]:
    async with h._default().get(f"{h.mgmt_url}{path}") as r:
        return r.status, await r.text()


async def test_scheduled_backups_rotate_verify_and_show_in_metrics(tmp_path):
    bdir = tmp_path / "backups"
    h = await start_harness(tmp_path, backup={"dir": str(bdir), "interval": 0.4, "keep": 2})
    try:
        store = await h.keystore("sched")
        await h.key(store, "SECRET", "s", secretValue="scheduled")
        state = h.rt.extra[STATE]
        seen: set[str] = set()

        async def three_taken():
            if state.last_file:
                seen.add(state.last_file)
            return len(seen) >= 3
        await until(three_taken, "three scheduled backups")
        await until(lambda: len(backups_in(bdir)) == 2, "pruning to keep = 2")
        files = backups_in(bdir)
        for f in files:
            assert oct(f.stat().st_mode & 0o777) == "0o600"
        async with unsealed_barrier(h.server.config) as barrier:
            report = await verify_file(files[-1], barrier)
        assert report.manifest.tables and report.records > 0
        st, text = await _get(h, "/metrics")
        assert st == 200
        ts = float(re.search(r"^skm_backup_last_success_timestamp (\S+)$", text, re.M).group(1))
        size = float(re.search(r"^skm_backup_last_size_bytes (\S+)$", text, re.M).group(1))
        assert abs(ts - time.time()) < 30 and size > 1000
        st, text = await _get(h, "/healthz")
        assert st == 200 and "warnings" not in text
    finally:
        await h.close()


async def test_healthz_warns_when_backups_fail_for_twice_the_interval(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the backup directory should be")
    h = await start_harness(tmp_path, backup={"dir": str(blocked), "interval": 0.3, "keep": 2})
    try:
        async def warned():
            st, text = await _get(h, "/healthz")
            return st == 200 and "warnings" in text and text
        text = await until(warned, "a /healthz backup warning")
        assert "no scheduled backup has succeeded" in text and "twice the interval" in text
        st, metrics = await _get(h, "/metrics")
        assert float(re.search(r"^skm_backup_failures_total (\S+)$", metrics, re.M).group(1)) >= 1
    finally:
        await h.close()


def test_the_warning_rule():
    s = ScheduleState(BackupSettings(dir="/x", interval=100.0, keep=1), started=1000.0, leader=True)
    assert s.warning(now=1150.0) is None                    # not yet twice the interval since start
    assert "no scheduled backup has succeeded" in s.warning(now=1201.0)
    s.last_success = 1200.0
    assert s.warning(now=1399.0) is None
    assert "the last scheduled backup" in s.warning(now=1401.0)
    s.leader = False                                        # another replica takes them: not ours to warn
    assert s.warning(now=5000.0) is None


async def test_one_replica_takes_the_backups_on_postgresql(request, tmp_path):
    cluster = session_cluster(request.config)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(cluster.database())
        a = await start_harness(tmp_path / "a", storage=url,
                                backup={"dir": str(tmp_path / "a-backups"), "interval": 0.3, "keep": 3})
        try:
            # A second replica on the same database, with the same keys (copied, as replicas share them).
            import shutil
            shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "data")
            from server.app import KeyServer
            from tests.support.server import make_config
            cfg = make_config(tmp_path / "b" / "data", storage=url,
                              backup={"dir": str(tmp_path / "b-backups"), "interval": 0.3, "keep": 3})
            b = await KeyServer(cfg).start()
            try:
                sa, sb = a.rt.extra[STATE], b.runtime.extra[STATE]

                await until(lambda: sa.attempts >= 3 and sb.attempts >= 3, "both replicas asking for the lock")
                assert sa.leader != sb.leader
                winner, loser = ("a", "b") if sa.leader else ("b", "a")
                assert len(backups_in(tmp_path / f"{winner}-backups")) >= 2
                assert not (tmp_path / f"{loser}-backups").exists()
            finally:
                await b.stop()
        finally:
            await a.close()
