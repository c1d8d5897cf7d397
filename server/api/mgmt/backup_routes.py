"""Management API: an online backup, streamed (/api/v1/backup). Admin only; audited as `backup.start`
(before the first byte leaves) and `backup.create` (the request's record, when the stream ended).

The response is the backup file itself (application/octet-stream, server/backup/image.py): the
snapshot's image is made in a private scratch directory first (its manifest is read from it), then
streamed under the MAC; the scratch copy is removed when the stream ends. A failure after
the first byte cannot change the status any more; the file then lacks its integrity trailer, and
the CLI (and every verify) refuses it as truncated.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from server import logs
from server.api.mgmt.auth import admin
from server.api.routing import RouteTable
from server.backup.lock import backup_lock
from server.backup.format import SUFFIX
from server.backup.snapshot import create_backup
from server.audit import AUDIT_ACTION, AUDIT_DETAIL
from server.errors import Conflict
from server.runtime import runtime
from server.timeutil import now_db

routes = RouteTable("/api/v1")
log = logs.get("skm.backup")


@routes.route("POST", "/backup", summary="Stream an online, consistent backup of the whole store (sealed records, "
              "manifest, MAC)", tags=("backup",), raw=True, media_type="application/octet-stream",
              response_schema={"type": "string", "format": "binary"})
async def create(request: web.Request, _body) -> web.StreamResponse:
    op = await admin(request)
    request[AUDIT_ACTION] = "backup.create"
    rt = runtime(request)
    lock = backup_lock(rt)
    if lock.locked():
        raise Conflict("a backup is already running on this server; try again when it has finished")
    async with lock:
        stamp = now_db().replace(":", "").replace("-", "").split(".")[0]
        resp = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="skm-{stamp}Z{SUFFIX}"'})
        started = False
        manifest = None

        def named(m) -> None:
            nonlocal manifest
            manifest = m
            request.setdefault(AUDIT_DETAIL, {})["backupId"] = m.backup_id

        async def sink(data: bytes) -> None:
            nonlocal started
            if not started:
                # The request's own record is written when the stream ends; the data must not leave
                # before a durable record says who took it (fail-closed audit refuses here, cleanly).
                if rt.audit is not None:
                    await rt.audit.event("backup.start", actor=op.name, actor_kind="operator",
                                         detail={"backupId": manifest.backup_id, "records": manifest.total_records})
                await resp.prepare(request)        # only once the snapshot is open and the manifest built
                started = True
            await resp.write(data)

        try:
            summary = await create_backup(rt.storage, rt.barrier, sink, on_manifest=named)
        except (ConnectionResetError, asyncio.CancelledError):
            log.warning("backup_client_went_away", actor=op.name)
            raise
        except Exception as e:
            if not started:
                raise                              # still time for a clean error envelope
            # The file ends without its trailer: the CLI and every verify refuse it as truncated.
            log.error("backup_stream_failed", actor=op.name, error_type=type(e).__name__)
            return resp
        await resp.write_eof()
        log.info("backup_created", actor=op.name, backup_id=summary.backup_id, records=summary.records,
                 bytes=summary.bytes, seconds=summary.seconds)
        return resp
