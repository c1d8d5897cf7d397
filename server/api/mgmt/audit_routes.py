"""Management API: the audit log (query with filters, verify the hash chain)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from aiohttp import web
from pydantic import BaseModel

from server.api.mgmt.auth import operator
from server.api.params import int_param
from server.api.routing import RouteTable
from server.audit import parse_time
from server.audit.actions import check_filter
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
    projectId: Optional[int] = None
    keyStoreId: Optional[int] = None
    keyId: Optional[str] = None
    change: Optional[bool] = None
    status: Optional[int] = None
    result: str
    reason: Optional[str] = None
    detail: dict[str, Any]
    prevHash: str
    hash: str
    tag: Optional[str] = None


class AuditList(BaseModel):
    records: list[AuditRecord]
    nextAfterSeq: Optional[int] = None
    nextBeforeSeq: Optional[int] = None


class VerifyOut(BaseModel):
    ok: bool
    status: Literal["intact", "broken", "unverified"] = "intact"     # unverified: not all could be checked
    checked: int
    headSeq: int
    brokenSeq: Optional[int] = None
    reason: Optional[str] = None
    keyed: bool = False
    untagged: int = 0
    checkpoints: Optional[dict[str, Any]] = None
    warnings: list[str] = []


class PubkeyOut(BaseModel):
    publicKey: str
    fingerprint: str


class CheckpointsOut(BaseModel):
    epoch: str
    sources: list[str]
    checkpoints: list[dict[str, Any]]


def _audit(request: web.Request):
    a = runtime(request).audit
    if a is None:
        raise Unavailable("the audit log is not available on this server")
    return a


@routes.route("GET", "/audit", summary="Query the audit log", response=AuditList, tags=("audit",),
              query={"since": {"type": "string", "format": "date-time"},
                     "until": {"type": "string", "format": "date-time"}, "actor": {"type": "string"},
                     "plane": {"type": "string", "enum": ["data", "mgmt", "system", "sidecar"]},
                     "keyId": {"type": "string"}, "keyStoreId": {"type": "integer"},
                     "result": {"type": "string", "enum": ["ok", "denied", "refused", "error", "approval_required"]},
                     "action": {"type": "string"}, "changes": {"type": "boolean"},
                     "order": {"type": "string", "enum": ["asc", "desc"]}, "afterSeq": {"type": "integer"},
                     "beforeSeq": {"type": "integer"}, "limit": {"type": "integer"}})
async def query(request: web.Request, _body) -> dict:
    op = await operator(request)
    q = request.query
    limit = int_param(q, "limit", 100, 1, 1000)
    order = q.get("order") or "asc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("order is asc (oldest first) or desc (newest first)")
    changes = q.get("changes") or "false"
    if changes not in ("true", "false", "1", "0"):
        raise InvalidRequest("changes is true or false")
    action = q.get("action") or None
    if action is not None:
        # An unknown name would match nothing: a typo must not read as "no such records".
        refused = check_filter(action)
        if refused:
            raise InvalidRequest(refused)
    desc = order == "desc"
    before = int_param(q, "beforeSeq", None, 1, 2**62)
    records = await _audit(request).query(
        since=parse_time(q.get("since"), "since"), until=parse_time(q.get("until"), "until"),
        actor=q.get("actor") or None, plane=q.get("plane") or None, key_id=q.get("keyId") or None,
        keystore_id=int_param(q, "keyStoreId", None, 0, 10**12), result=q.get("result") or None,
        action=action, after_seq=int_param(q, "afterSeq", 0, 0, 2**62), before_seq=before,
        limit=limit, changes=changes in ("true", "1"), newest_first=desc, project_ids=_scope(op))
    nxt = records[-1]["seq"] if len(records) == limit else None
    return {"records": records, "nextAfterSeq": None if desc else nxt, "nextBeforeSeq": nxt if desc else None}


def _scope(op) -> list[int] | None:
    """The projects an operator may see records of (None: every project, a global operator)."""
    scope = op.projects()
    return None if scope is None else sorted(scope)


@routes.route("GET", "/audit/verify", summary="Check the keyed chain and the signed checkpoints; report the first "
              "bad record", response=VerifyOut, tags=("audit",))
async def verify(request: web.Request, _body) -> dict:
    op = await operator(request)
    op.require("admin", "approver", "viewer")      # the whole chain: global operators only
    return (await _audit(request).verify()).to_api()


@routes.route("GET", "/audit/pubkey", summary="The checkpoint public key (PEM), for verifying exports offline",
              response=PubkeyOut, tags=("audit",))
async def pubkey(request: web.Request, _body) -> dict:
    op = await operator(request)
    op.require("admin", "approver", "viewer")      # the whole chain's key: global operators only
    from server.audit.checkpoints import pub_b64, pub_pem
    import hashlib
    import base64
    pub = await _audit(request).public_key()
    return {"publicKey": pub_pem(pub), "fingerprint": hashlib.sha256(base64.b64decode(pub_b64(pub))).hexdigest()}


@routes.route("GET", "/audit/checkpoints", summary="The signed checkpoints of the current epoch (from the "
              "checkpoint stores)", response=CheckpointsOut, tags=("audit",))
async def checkpoints(request: web.Request, _body) -> dict:
    op = await operator(request)
    op.require("admin", "approver", "viewer")      # the whole chain: global operators only
    found, read, epoch = await _audit(request).checkpoints()
    mine = sorted((c for c in found if c["checkpoint"]["epoch"] == epoch), key=lambda c: c["checkpoint"]["seq"])
    return {"epoch": epoch, "sources": read, "checkpoints": mine}
