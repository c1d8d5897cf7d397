"""Management API: change requests of approval key stores (list, show with diff, approve, deny, cancel)."""
from __future__ import annotations

from typing import Any, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.api.mgmt.auth import name_in_audit, operator
from server.api.routing import RouteTable
from server.api.params import int_param
from server.errors import InvalidRequest, Unavailable
from server.runtime import runtime
from server.text import SafeText

routes = RouteTable("/api/v1")
_CR = r"/approvals/{request_id:\d{1,12}}"


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: SafeText = Field(default="", max_length=1000, description="approve: a note; deny: the reason")


class ApprovalOut(BaseModel):
    operator: str
    comment: str
    datetime: Optional[str] = None


class ChangeRequestOut(BaseModel):
    changeRequestId: int
    keyStoreId: Optional[int] = Field(default=None, description="null: an operator management request")
    projectId: Optional[int] = None
    credential: Optional[str] = Field(default=None, description="what the requester acted with "
                                      "(token:ID, accesskey:ID, bearer:ID); the requester is always an operator")
    operation: str
    status: str
    requestedBy: str
    approvalsNeeded: int
    approvals: list[ApprovalOut]
    diff: dict[str, Any] = Field(description="what will change; secret values masked")
    reason: Optional[str] = None
    result: Optional[dict[str, Any]] = None
    decidedBy: Optional[str] = None
    creationDatetime: Optional[str] = None
    expirationDatetime: Optional[str] = None
    decisionDatetime: Optional[str] = None


class ChangeRequestList(BaseModel):
    changeRequests: list[ChangeRequestOut]


def _svc(request: web.Request):
    rt = runtime(request)
    svc = rt.changes.approvals if rt.changes is not None else None
    if svc is None:
        raise Unavailable("the approval workflow is not available on this server")
    return svc


def _id(request: web.Request) -> int:
    return int(request.match_info["request_id"])


async def _scoped(request: web.Request, out: dict) -> dict:
    """`out` (a change request), its project and key store named in the request's audit record, so a
    project's operators find the decisions on their requests."""
    await name_in_audit(request, keystore_id=out.get("keyStoreId"), project_id=out.get("projectId"))
    return out


@routes.route("GET", "/approvals", summary="List change requests", response=ChangeRequestList, tags=("approvals",),
              query={"status": {"type": "string"}, "keyStoreId": {"type": "integer"},
                     "requestedBy": {"type": "string"}, "limit": {"type": "integer"}})
async def list_requests(request: web.Request, _body) -> dict:
    await operator(request)
    q = request.query
    ks = int_param(q, "keyStoreId", None)
    limit = int_param(q, "limit", 100, 1, 1000)
    status = q.get("status")
    op = await operator(request)
    return {"changeRequests": await _svc(request).list(
        status=status.upper() if status else None, keystore_id=ks,
        requested_by=q.get("requestedBy") or None, limit=limit, project_ids=op.projects())}


@routes.route("GET", _CR, summary="One change request with its diff", response=ChangeRequestOut,
              tags=("approvals",))
async def get_request(request: web.Request, _body) -> dict:
    op = await operator(request)
    svc = _svc(request)
    await svc.expire_due()
    return await _scoped(request, await svc.get(_id(request), by=op))


@routes.route("POST", _CR + "/approve", summary="Approve (approver role; never your own request)",
              body=DecisionIn, body_optional=True, response=ChangeRequestOut, tags=("approvals",))
async def approve(request: web.Request, body: DecisionIn) -> dict:
    op = await operator(request)
    return await _scoped(request, await _svc(request).approve(op, _id(request), body.comment))


@routes.route("POST", _CR + "/deny", summary="Deny (approver role)", body=DecisionIn, body_optional=True,
              response=ChangeRequestOut, tags=("approvals",))
async def deny(request: web.Request, body: DecisionIn) -> dict:
    op = await operator(request)
    return await _scoped(request, await _svc(request).deny(op, _id(request), body.comment))


@routes.route("POST", _CR + "/cancel", summary="Cancel your own pending request", response=ChangeRequestOut,
              tags=("approvals",))
async def cancel(request: web.Request, _body) -> dict:
    op = await operator(request)
    return await _scoped(request, await _svc(request).cancel(op, _id(request)))


class CollectOut(BaseModel):
    token: Optional[str] = Field(default=None, description="an operator token (shown once)")
    accessKeyId: Optional[str] = None
    secretAccessKey: Optional[str] = Field(default=None, description="a user access key secret (shown once)")


@routes.route("POST", _CR + "/collect", summary="Take, once, the credential your applied request made for "
              "someone else", response=CollectOut, tags=("approvals",))
async def collect(request: web.Request, _body) -> dict:
    op = await operator(request)
    return await _svc(request).collect(op, _id(request))
