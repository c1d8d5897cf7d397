"""Scheduled backups inside the key server: `[backup] dir, interval, keep`.

One process takes them: the management process of a server (worker 0 with workers), and on
PostgreSQL only the replica holding the `skm-backup` advisory lock (like the background jobs).
Each backup is written to `<dir>/skm-<UTC time>.skmbak.partial`, fsynced and renamed, then all
but the newest `keep` are deleted. /metrics has the last success time and size; /healthz warns
when the last success is older than twice the interval.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from server import logs
from server.backup.lock import backup_lock
from server.backup.format import SUFFIX
from server.backup.snapshot import Summary, create_backup
from server.settings import BackupSettings

log = logs.get("skm.backup")
LOCK_NAME = "skm-backup"
STATE = "backup_schedule"        # rt.extra key
PREFIX = "skm-"


@dataclass
class ScheduleState:
    settings: BackupSettings
    started: float = field(default_factory=time.time)
    leader: bool = False                  # this process takes the backups (holds the lock)
    attempts: int = 0                     # times it asked for the lock
    last_success: float | None = None     # unix time
    last_size: int | None = None
    last_file: str | None = None
    last_error: str | None = None

    def warning(self, now: float | None = None) -> str | None:
        """/healthz: the last success (or, before one, the schedule's start) older than twice the interval."""
        if not self.leader:
            return None
        now = time.time() if now is None else now
        since = self.last_success if self.last_success is not None else self.started
        limit = 2 * self.settings.interval
        if now - since <= limit:
            return None
        what = "no scheduled backup has succeeded" if self.last_success is None else "the last scheduled backup"
        return (f"{what} in {int(now - since)} s (more than twice the interval of {self.settings.interval:g} s)"
                + (f"; last error: {self.last_error}" if self.last_error else ""))

    def to_api(self) -> dict:
        return {"dir": self.settings.dir, "interval": self.settings.interval, "keep": self.settings.keep,
                "leader": self.leader, "lastSuccess": self.last_success, "lastSize": self.last_size,
                "lastFile": self.last_file, "lastError": self.last_error}


def backups_in(directory: Path) -> list[Path]:
    """This schedule's backups in `directory`, oldest first (the names sort by time)."""
    return sorted(p for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


def _file_name(now: float) -> str:
    return PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}" + SUFFIX


async def backup_to_file(storage, barrier, path: Path) -> Summary:
    """One backup into `path` (0600, written beside it first, renamed once complete and fsynced)."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    f = os.fdopen(fd, "wb")
    ok = False
    try:
        summary = await create_backup(storage, barrier, lambda data: asyncio.to_thread(f.write, data))

        def finish() -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(partial, path)
        await asyncio.to_thread(finish)
        ok = True
        return summary
    finally:
        if not f.closed:
            f.close()
        if not ok:
            partial.unlink(missing_ok=True)


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups; returns what was deleted."""
    files = backups_in(directory)
    gone = files[:-keep] if keep > 0 else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


async def take_one(rt, state: ScheduleState) -> Summary:
    directory = Path(state.settings.dir)
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    path = directory / _file_name(now)
    async with backup_lock(rt):
        summary = await backup_to_file(rt.storage, rt.barrier, path)
    state.last_success, state.last_size, state.last_file, state.last_error = time.time(), summary.bytes, str(path), None
    rt.metrics.backup_last_success.set(state.last_success)
    rt.metrics.backup_last_size.set(summary.bytes)
    rt.metrics.backup_last_seconds.set(summary.seconds)
    gone = await asyncio.to_thread(prune, directory, state.settings.keep)
    log.info("scheduled_backup_written", file=str(path), records=summary.records, bytes=summary.bytes,
             seconds=summary.seconds, pruned=len(gone))
    return summary


def _seed_from_disk(rt, state: ScheduleState) -> None:
    """After a restart the newest file in the directory is the last success (no backup storm, no false alarm)."""
    directory = Path(state.settings.dir)
    files = backups_in(directory) if directory.is_dir() else []
    if files:
        st = files[-1].stat()
        state.last_success, state.last_size, state.last_file = st.st_mtime, st.st_size, str(files[-1])
        rt.metrics.backup_last_success.set(st.st_mtime)
        rt.metrics.backup_last_size.set(st.st_size)


def start_schedule(rt) -> asyncio.Task:
    """The scheduler task (KeyServer starts it in the process that runs the jobs); its state is in
    rt.extra[STATE] from now on, for /healthz."""
    state = rt.extra[STATE] = ScheduleState(BackupSettings.from_config(rt.config))
    return asyncio.get_running_loop().create_task(run_schedule(rt, state), name="backup-schedule")


async def run_schedule(rt, state: ScheduleState) -> None:
    settings = state.settings
    await asyncio.to_thread(_seed_from_disk, rt, state)
    retry = min(60.0, settings.interval)
    while True:
        last = state.last_success or 0.0
        await asyncio.sleep(max(0.0, last + settings.interval - time.time()))
        if rt.barrier.sealed:
            await asyncio.sleep(min(retry, 5.0))
            continue
        try:
            state.leader = await rt.storage.try_lock(LOCK_NAME)
            state.attempts += 1
            if not state.leader:
                await asyncio.sleep(settings.interval)     # another replica takes them
                continue
            await take_one(rt, state)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in /healthz and /metrics, retried
            state.last_error = getattr(e, "detail", None) or type(e).__name__
            rt.metrics.backup_failures.inc()
            log.error("scheduled_backup_failed", error_type=type(e).__name__, reason=state.last_error)
            await asyncio.sleep(retry)
