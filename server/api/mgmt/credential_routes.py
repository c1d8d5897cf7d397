"""Management API: user access keys, the v1.2/v1.3 caller credentials of the client API.

An operator manages their own keys; a global admin also creates (under approval
when `[approvals] operators` is on) and deletes keys of other operators. The secret is in the create response only.
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.api.mgmt.auth import name_in_audit, operator
from server.api.routing import RouteTable
from server.errors import InvalidAppkey, InvalidRequest
from server.runtime import runtime
from server.text import SafeText

routes = RouteTable("/api/v1")


class AccessKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: Optional[str] = Field(default=None, min_length=1, max_length=64,
                                    description="owner (admins only; default: the caller)")
    description: SafeText = Field(default="", max_length=1000)
    appkey: Optional[str] = Field(default=None, max_length=64,
                                  description="bind the key to this project's appkey (default: every project)")
    expiresInDays: Optional[int] = Field(default=None, ge=1, le=3650)


class AccessKeyOut(BaseModel):
    accessKeyId: str
    secretAccessKey: Optional[str] = None
    operator: str
    projectId: Optional[int] = None
    description: str
    expirationDate: Optional[str] = None
    creationUser: str
    creationDatetime: Optional[str] = None


class AccessKeyList(BaseModel):
    accessKeys: list[AccessKeyOut]


@routes.route("POST", "/access-keys", summary="Create a user access key (the secret is shown once)",
              body=AccessKeyIn, response=AccessKeyOut, tags=("access-keys",), status=201)
async def create_access_key(request: web.Request, body: AccessKeyIn) -> dict:
    op = await operator(request)
    rt = runtime(request)
    owner = op
    if body.operator is not None and body.operator != op.name:
        op.require("admin")
        owner = await rt.operators.by_name(body.operator)
    project_id = None
    if body.appkey:
        project = await rt.keys.project_by_appkey(body.appkey)
        if project is None or not op.sees(project.id):
            raise InvalidAppkey("no project has that appkey")
        if not owner.has(("admin", "approver", "viewer"), project.id):
            raise InvalidRequest(f"{owner.name} holds no role in that project; a key bound to it would never work")
        project_id = project.id
        await name_in_audit(request, project_id=project_id)
    if owner.id != op.id:
        # A credential for someone else puts that operator in the issuer's hands: operator management.
        out = await rt.changes.submit_operator_change(op, "accesskey.create", {
            "name": owner.name, "description": body.description, "project_id": project_id,
            "ttl_days": body.expiresInDays})
        collect = out.pop("_collect")
        return {**out, "secretAccessKey": collect["secretAccessKey"]}
    key, secret = await rt.callers.create_key(owner, actor=op.name, description=body.description,
                                              project_id=project_id, ttl_days=body.expiresInDays)
    return {**key.to_api(), "secretAccessKey": secret}


@routes.route("GET", "/access-keys", summary="List user access keys (global admins: everyone's)",
              response=AccessKeyList, tags=("access-keys",))
async def list_access_keys(request: web.Request, _body) -> dict:
    op = await operator(request)
    keys = await runtime(request).callers.keys(None if op.has(("admin",)) else op.id)
    return {"accessKeys": [k.to_api() for k in keys]}


@routes.route("DELETE", r"/access-keys/{key_id:[A-Z0-9]{1,64}}",
              summary="Delete a user access key and every token issued from it", response=AccessKeyOut,
              tags=("access-keys",))
async def delete_access_key(request: web.Request, _body) -> dict:
    op = await operator(request)
    rt = runtime(request)
    key = await rt.callers.key(request.match_info["key_id"])
    await rt.callers.delete_key(key.id, op)
    return key.to_api()
