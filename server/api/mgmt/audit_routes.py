"""Management API: the audit log (query with filters, verify the hash chain)."""
from __future__ import annotations

import inspect
from typing import Any, Optional

from aiohttp import web
from pydantic import BaseModel

from server.api.mgmt.auth import operator
from server.api.routing import RouteTable
from server.audit import parse_time
from server.errors import InvalidRequest, Unavailable
from server.runtime import runtime

routes = RouteTable("/api/v1")


class AuditRecord(BaseModel):
    seq: int
    time: str
    plane: str
    actor: str
    actorKind: str
    ip: Optional[str] = None
    fingerprint: Optional[str] = None
    mac: Optional[str] = None
    method: Optional[str] = None
    route: Optional[str] = None
    action: str
    keyStoreId: Optional[int] = None
    keyId: Optional[str] = None
    status: Optional[int] = None
    result: str
    reason: Optional[str] = None
    detail: dict[str, Any]
    prevHash: str
    hash: str


class AuditList(BaseModel):
    records: list[AuditRecord]
    nextAfterSeq: Optional[int] = None


class VerifyOut(BaseModel):
    ok: bool
    checked: int
    headSeq: int
    brokenSeq: Optional[int] = None
    reason: Optional[str] = None


def _audit(request: web.Request):
    a = runtime(request).audit
    if a is None:
        raise Unavailable("the audit log is not available on this server")
    return a


def _int(q, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = q.get(name)
    if v is None or v == "":
        return default
    if not v.isdigit() or not lo <= int(v) <= hi:
        raise InvalidRequest(f"{name} must be a whole number from {lo} to {hi}")
    return int(v)


@routes.route("GET", "/audit", summary="Query the audit log", response=AuditList, tags=("audit",),
              query={"since": {"type": "string", "format": "date-time"},
                     "until": {"type": "string", "format": "date-time"}, "actor": {"type": "string"},
                     "plane": {"type": "string", "enum": ["data", "mgmt", "system"]}, "keyId": {"type": "string"},
                     "keyStoreId": {"type": "integer"},
                     "result": {"type": "string", "enum": ["ok", "denied", "refused", "error", "approval_required"]},
                     "action": {"type": "string"}, "afterSeq": {"type": "integer"}, "limit": {"type": "integer"}})
async def query(request: web.Request, _body) -> dict:
    op = await operator(request)
    q = request.query
    limit = _int(q, "limit", 100, 1, 1000)
    audit = _audit(request)
    scope = {}
    if op.projects() is not None:
        # A project-scoped operator reads its projects' records only (records carry project_id).
        if "project_ids" not in inspect.signature(audit.query).parameters:
            raise Unavailable("this server's audit log cannot filter by project; project-scoped operators "
                              "cannot read it here (ask a global operator)")   # fail closed
        scope = {"project_ids": sorted(op.projects())}
    records = await audit.query(**scope,
        since=parse_time(q.get("since"), "since"), until=parse_time(q.get("until"), "until"),
        actor=q.get("actor") or None, plane=q.get("plane") or None, key_id=q.get("keyId") or None,
        keystore_id=_int(q, "keyStoreId", None, 0, 10**12), result=q.get("result") or None,
        action=q.get("action") or None, after_seq=_int(q, "afterSeq", 0, 0, 2**62), limit=limit)
    return {"records": records, "nextAfterSeq": records[-1]["seq"] if len(records) == limit else None}


@routes.route("GET", "/audit/verify", summary="Walk the hash chain; report the first broken link",
              response=VerifyOut, tags=("audit",))
async def verify(request: web.Request, _body) -> dict:
    op = await operator(request)
    op.require("admin", "approver", "viewer")      # the whole chain: global operators only
    return (await _audit(request).verify()).to_api()
