"""Management API: the barrier and the system-key keyring (/api/v1/system/...).

Status for operators; keyring refresh (pick up a version added by `skm systemkey
rotate`), the online rewrap job (one at a time, progress in /metrics and here)
and retirement of a version no record uses any more are admin operations.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import web
from pydantic import BaseModel, Field

from server import logs
from server.api.mgmt.auth import admin, operator
from server.api.routing import RouteTable
from server.barrier.rewrap import count_by_version, rewrap
from server.errors import Conflict, InvalidRequest, SKMError
from server.runtime import Runtime, runtime
from server.timeutil import now_db

routes = RouteTable("/api/v1")
log = logs.get("skm.barrier")

MAX_BATCH = 5000
KEYRING_REFRESHED = "keyring_refreshed"     # the event other processes follow (server/barrier/remote.py)
_JOB = "rewrap_job"


# --- models ------------------------------------------------------------------
class RewrapIn(BaseModel):
    batch: int = Field(default=200, ge=1, le=MAX_BATCH)


class RewrapJobOut(BaseModel):
    state: str                     # idle | running | done | failed
    done: int = 0
    total: int = 0
    targetVersion: Optional[int] = None
    startedAt: Optional[str] = None
    finishedAt: Optional[str] = None
    seconds: Optional[float] = None
    error: Optional[str] = None


class SystemStatusOut(BaseModel):
    sealed: bool
    reason: Optional[str] = None
    currentVersion: Optional[int] = None
    versions: list[int] = []
    recordsByVersion: dict[str, int] = {}
    rewrap: RewrapJobOut


class RefreshOut(BaseModel):
    added: list[int]
    currentVersion: int
    versions: list[int]


class RetireOut(BaseModel):
    retired: int
    versions: list[int]
    currentVersion: int


# --- the rewrap job ----------------------------------------------------------
@dataclass
class RewrapJob:
    state: str = "idle"
    done: int = 0
    total: int = 0
    target: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    error: str | None = None
    _t0: float = 0.0
    task: Any = None

    def to_api(self) -> dict:
        return {"state": self.state, "done": self.done, "total": self.total, "targetVersion": self.target,
                "startedAt": self.started_at, "finishedAt": self.finished_at, "seconds": self.seconds,
                "error": self.error}


def _job(rt: Runtime) -> RewrapJob:
    job = rt.extra.get(_JOB)
    if job is None:
        job = rt.extra[_JOB] = RewrapJob()
    return job


async def _run_rewrap(rt: Runtime, job: RewrapJob, batch: int) -> None:
    def progress(done: int, total: int) -> None:
        job.done, job.total = done, total
        rt.metrics.rewrap_done.set(done)
        rt.metrics.rewrap_total.set(total)

    try:
        n = await rewrap(rt.storage, rt.barrier, batch=batch, progress=progress)
        job.state = "done"
        log.info("rewrap_finished", records=n, system_key_version=job.target)
    except asyncio.CancelledError:
        job.state, job.error = "failed", "cancelled (the server stopped)"
        raise
    except SKMError as e:
        job.state, job.error = "failed", str(e)
        log.error("rewrap_failed", reason=str(e))
    except Exception as e:  # noqa: BLE001 - reported on the job; never the record's content
        job.state, job.error = "failed", f"unexpected {type(e).__name__}; see the key server log"
        log.exception("rewrap_failed", error_type=type(e).__name__)
    finally:
        job.finished_at = now_db()
        job.seconds = round(time.monotonic() - job._t0, 3)
        job.task = None


async def _stop_rewrap(rt: Runtime) -> None:
    task = _job(rt).task
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping; already recorded on the job
            pass


# --- routes --------------------------------------------------------------------
@routes.route("GET", "/system/status", summary="Barrier state, system-key versions and records per version",
              response=SystemStatusOut, tags=("system",))
async def system_status(request: web.Request, _body) -> dict:
    await operator(request)     # sealed: 503 Sealed with the reason
    rt = runtime(request)
    counts = await count_by_version(rt.storage)
    b = rt.barrier
    return {"sealed": b.sealed, "reason": b.sealed_reason if b.sealed else None,
            "currentVersion": b.current_version, "versions": b.versions(),
            "recordsByVersion": {str(v): n for v, n in counts.items()}, "rewrap": _job(rt).to_api()}


@routes.route("POST", "/system/keyring/refresh", summary="Fetch the keyring again and seal new writes with its "
              "current version", response=RefreshOut, tags=("system",))
async def refresh(request: web.Request, _body) -> dict:
    op = await admin(request)
    rt = runtime(request)
    from server.barrier.remote import refresh_keyring
    from server.barrier.sources import key_sources
    source, root = await key_sources(rt)
    added = await refresh_keyring(rt.barrier, source, root, log=log)
    log.info("keyring_refreshed", actor=op.name, added=added, system_key_version=rt.barrier.current_version)
    if added:
        # Other replicas and workers fetch it too: records sealed here under the new version must open there.
        from server.events import Event
        await rt.events.publish(Event(keystore_id=0, kind=KEYRING_REFRESHED))
    return {"added": added, "currentVersion": rt.barrier.current_version, "versions": rt.barrier.versions()}


@routes.route("POST", "/system/rewrap", summary="Start re-sealing every record under the current system-key version",
              body=RewrapIn, body_optional=True, response=RewrapJobOut, tags=("system",))
async def start_rewrap(request: web.Request, body: RewrapIn | None) -> dict:
    op = await admin(request)
    rt = runtime(request)
    job = _job(rt)
    if job.task is not None:
        raise Conflict("a rewrap is already running; follow it with GET /api/v1/system/rewrap")
    batch = (body or RewrapIn()).batch
    job = rt.extra[_JOB] = RewrapJob(state="running", target=rt.barrier.current_version, started_at=now_db(),
                                     _t0=time.monotonic())
    rt.metrics.rewrap_done.set(0)
    rt.metrics.rewrap_total.set(0)
    if _stop_rewrap not in rt.extra.setdefault("on_stop", []):
        rt.extra["on_stop"].insert(0, _stop_rewrap)
    job.task = asyncio.get_running_loop().create_task(_run_rewrap(rt, job, batch), name="rewrap")
    log.info("rewrap_started", actor=op.name, batch=batch, system_key_version=job.target)
    return job.to_api()


@routes.route("GET", "/system/rewrap", summary="Progress of the running (or last) rewrap", response=RewrapJobOut,
              tags=("system",))
async def rewrap_progress(request: web.Request, _body) -> dict:
    await operator(request)
    return _job(runtime(request)).to_api()


@routes.route("POST", r"/system/keyring/retire/{version:\d{1,9}}", summary="Drop a system-key version no record "
              "uses any more", response=RetireOut, tags=("system",))
async def retire(request: web.Request, _body) -> dict:
    op = await admin(request)
    rt = runtime(request)
    version = int(request.match_info["version"])
    b = rt.barrier
    if version not in b.versions():
        raise InvalidRequest(f"this server holds no system-key version {version}")
    if version == b.current_version:
        raise Conflict("cannot retire the current system-key version; rotate and rewrap first")
    if _job(rt).task is not None:
        raise Conflict("a rewrap is running; retire once it has finished")
    in_use = (await count_by_version(rt.storage)).get(version, 0)
    if in_use:
        raise Conflict(f"{in_use} record(s) are still sealed under version {version}; run `skm barrier rewrap` first")
    b.retire(version)
    await _retire_in_local_keyring(rt, version)
    log.info("system_key_version_retired", actor=op.name, version=version)
    return {"retired": version, "versions": b.versions(), "currentVersion": b.current_version}


async def _retire_in_local_keyring(rt: Runtime, version: int) -> None:
    """A local keyring file is this server's to update; a system-key server is retired with `skm systemkey retire`."""
    if rt.config.systemkey.source != "local":
        return
    from server.barrier.keyring import load_keyring_file, save_keyring_file
    path = rt.config.system_key_path()

    def _update() -> None:
        ring = load_keyring_file(path)
        if version in ring.versions and version != ring.current and version not in ring.retired:
            ring.retired = tuple(sorted({*ring.retired, version}))
            save_keyring_file(path, ring)
    await asyncio.to_thread(_update)

