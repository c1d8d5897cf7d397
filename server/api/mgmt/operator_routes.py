"""Management API: operators, login, API tokens, whoami, and the console's secret reveal."""
from __future__ import annotations

from typing import Literal, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.access.operators import MAX_PASSWORD, Operator, check_password
from server.api.mgmt.auth import admin, key_for, operator
from server.api.params import int_param
from server.api.routing import RouteTable
from server.audit import AUDIT_ACTION, AUDIT_DETAIL
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, Sealed, Unauthenticated
from server.keys.model import KeyType
from server.runtime import OPERATOR, runtime
from server.text import SafeText

routes = RouteTable("/api/v1")
_OP = r"/operators/{name:[A-Za-z0-9._-]{1,64}}"
Role = Literal["admin", "approver", "viewer"]
# Fields that carry a password: the audit leaves them out of the body HMAC (server/audit/middleware.py).
SENSITIVE = {"sensitive": True}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(_In):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD, json_schema_extra=SENSITIVE)
    description: SafeText = Field(default="login", max_length=200)


class GrantOut(BaseModel):
    role: str
    projectId: Optional[int] = Field(default=None, description="null: a global role (every project)")
    grantedBy: Optional[str] = None
    grantedAt: Optional[str] = None


class GrantHistoryOut(GrantOut):
    revokedBy: Optional[str] = None
    revokedAt: Optional[str] = None


class GrantHistory(BaseModel):
    name: str
    grants: list[GrantHistoryOut]


class LoginOut(BaseModel):
    token: str
    operator: str
    role: str = Field(description="the global role; empty for an operator with project roles only")
    roles: list[GrantOut] = []
    expiresInHours: float


class OperatorIn(_In):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    role: Role
    projectId: Optional[int] = Field(default=None, ge=1, le=10**12,
                                     description="the role in this project only (default: a global role)")
    password: Optional[str] = Field(default=None, max_length=MAX_PASSWORD, json_schema_extra=SENSITIVE,
                                    description="optional: an operator without one uses tokens only")


class GrantIn(_In):
    role: Role
    projectId: Optional[int] = Field(default=None, ge=1, le=10**12,
                                     description="the role in this project only (default: the global role)")


class OperatorUpdate(_In):
    role: Optional[Role] = None
    disabled: Optional[bool] = None
    password: Optional[str] = Field(default=None, max_length=MAX_PASSWORD, json_schema_extra=SENSITIVE)
    currentPassword: Optional[str] = Field(default=None, max_length=MAX_PASSWORD, json_schema_extra=SENSITIVE,
                                           description="needed when changing your own password as a non-admin")
    unlock: bool = Field(default=False, description="clear a login lockout")


class OperatorOut(BaseModel):
    name: str
    role: str
    disabled: bool
    locked: bool
    hasPassword: bool
    activeTokens: int
    creationDatetime: Optional[str] = None
    createdBy: Optional[str] = Field(default=None, description="who created it (null: `skm server init` or "
                                     "before lineage was kept)")
    roles: list[GrantOut] = []


class OperatorList(BaseModel):
    operators: list[OperatorOut]


class WhoAmI(BaseModel):
    name: str
    role: str
    roles: list[GrantOut] = []
    tokenId: Optional[str] = None


class TokenIn(_In):
    description: SafeText = Field(default="", max_length=200)
    expiresInDays: Optional[float] = Field(default=90, gt=0, le=3650, description="null: never expires")
    operator: Optional[str] = Field(default=None, max_length=64, description="owner (admins only; default: you)")


class TokenOut(BaseModel):
    tokenId: str
    operator: str
    description: str
    creationDatetime: Optional[str] = None
    expirationDatetime: Optional[str] = None
    status: str


class TokenCreated(BaseModel):
    token: str = Field(description="shown once; store it now")
    tokenId: str
    operator: str


class TokenList(BaseModel):
    tokens: list[TokenOut]


class RevealOut(BaseModel):
    keyId: str
    keyVersion: int
    secretValue: str


# ------------------------------------------------------------------- login
@routes.route("POST", "/login", summary="Log in with name and password; returns an operator token",
              body=LoginIn, response=LoginOut, tags=("operators",), public=True)
async def login(request: web.Request, body: LoginIn) -> dict:
    rt = runtime(request)
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    request[AUDIT_ACTION] = "operator.login"
    ip = rt.access.client_ip(request) if rt.access is not None else (request.remote or "")
    try:
        op, token = await rt.operators.login(body.name, body.password, ip)
    except Exception:
        # The claimed name is recorded only as an HMAC: it may be a mistyped password.
        if rt.audit is not None:
            request[AUDIT_DETAIL] = {"nameHmac": await rt.audit.hmac(body.name)}
        raise
    request[OPERATOR] = op
    return {"token": token, "operator": op.name, "role": op.role, "roles": [g.to_api() for g in op.grants],
            "expiresInHours": rt.operators.settings.token_ttl_hours}


@routes.route("GET", "/whoami", summary="The operator this token belongs to", response=WhoAmI, tags=("operators",))
async def whoami(request: web.Request, _body) -> dict:
    op = await operator(request)
    return {"name": op.name, "role": op.role, "roles": [g.to_api() for g in op.grants], "tokenId": op.token_id}


# --------------------------------------------------------------- operators
def _visible(op: Operator, described: dict) -> dict | None:
    """What `op` may see of an operator: everything for a global role; for a project-scoped operator,
    the operators holding a role in one of its projects (those roles only), and itself."""
    mine = op.projects()
    if mine is None:
        return described
    roles = [g for g in described["roles"] if g["projectId"] in mine]
    if not roles and described["name"] != op.name:
        return None
    return {**described, "roles": roles if described["name"] != op.name else described["roles"],
            "createdBy": None if described["name"] != op.name else described["createdBy"]}


@routes.route("GET", "/operators", summary="List operators (project-scoped operators: those of their projects)",
              response=OperatorList, tags=("operators",))
async def list_operators(request: web.Request, _body) -> dict:
    op = await operator(request)
    seen = [_visible(op, d) for d in await runtime(request).operators.list()]
    return {"operators": [d for d in seen if d is not None]}


@routes.route("POST", "/operators", summary="Create an operator (global admin; a change request when "
              "[approvals] operators is on)", body=OperatorIn, response=OperatorOut, tags=("operators",), status=201)
async def create_operator(request: web.Request, body: OperatorIn) -> dict:
    op = await admin(request)
    rt = runtime(request)
    check_password(body.password) if body.password is not None else None
    if body.projectId is not None and await rt.keys.project(body.projectId) is None:
        raise NotFound(f"no project with id {body.projectId}")
    return await rt.changes.submit_operator_change(op, "operator.create", {
        "name": body.name, "role": body.role, "project_id": body.projectId, "password": body.password})


@routes.route("GET", _OP, summary="One operator", response=OperatorOut, tags=("operators",))
async def get_operator(request: web.Request, _body) -> dict:
    op = await operator(request)
    seen = _visible(op, await runtime(request).operators.describe(request.match_info["name"]))
    if seen is None:
        raise NotFound("no such operator")
    return seen


@routes.route("GET", _OP + "/roles", summary="Every role the operator ever held: who granted and revoked it, when",
              response=GrantHistory, tags=("operators",))
async def role_history(request: web.Request, _body) -> dict:
    op = await operator(request)
    name = request.match_info["name"]
    if name != op.name:
        op.require("admin", "approver", "viewer")
    return {"name": name, "grants": await runtime(request).operators.role_history(name)}


@routes.route("POST", _OP + "/roles", summary="Grant a role, global or in one project (global admin; a change "
              "request when [approvals] operators is on)", body=GrantIn, response=OperatorOut, tags=("operators",))
async def grant_role(request: web.Request, body: GrantIn) -> dict:
    op = await admin(request)
    rt = runtime(request)
    name = request.match_info["name"]
    if (await rt.operators.by_name(name)).id == op.id:
        raise Conflict("you cannot change your own roles; ask another admin")
    if body.projectId is not None and await rt.keys.project(body.projectId) is None:
        raise NotFound(f"no project with id {body.projectId}")
    return await rt.changes.submit_operator_change(op, "operator.grant", {
        "name": name, "role": body.role, "project_id": body.projectId})


@routes.route("DELETE", _OP + "/roles", summary="Revoke the operator's role in a project (projectId) or its global "
              "role (global admin; takes effect at once)", response=OperatorOut, tags=("operators",),
              query={"projectId": {"type": "integer"}})
async def revoke_role(request: web.Request, _body) -> dict:
    op = await admin(request)
    project_id = int_param(request.query, "projectId", None)
    return await runtime(request).operators.revoke(request.match_info["name"], project_id, by=op)


@routes.route("PATCH", _OP, summary="Change an operator's role, password, disabled flag or lockout",
              body=OperatorUpdate, response=OperatorOut, tags=("operators",))
async def update_operator(request: web.Request, body: OperatorUpdate) -> dict:
    op = await operator(request)
    rt = runtime(request)
    name = request.match_info["name"]
    if not op.has(("admin",)):
        # Everyone may change their own password, proving the current one.
        if name != op.name or body.role is not None or body.disabled is not None or body.unlock or not body.password:
            raise Forbidden("this needs the admin role (others may only change their own password)")
        if not body.currentPassword:
            raise InvalidRequest("send currentPassword to change your own password")
        ip = rt.access.client_ip(request) if rt.access is not None else (request.remote or "")
        try:
            await rt.operators.check_login(op.name, body.currentPassword, ip)
        except Unauthenticated:
            raise Forbidden("the current password is wrong") from None
        return await rt.operators.update(name, password=body.password, by=op)
    target = await rt.operators.by_name(name)
    if body.password is not None:
        check_password(body.password)
    reset = body.password is not None and target.id != op.id     # another's password: operator management
    regrant = body.role is not None and body.role != target.role
    if regrant and target.id == op.id:
        raise Conflict("you cannot change your own role or disable yourself; ask another admin")
    if reset and regrant and rt.approvals.settings.operators:
        raise InvalidRequest("send the role and the password separately: each becomes its own change request")
    described = await rt.operators.update(name, disabled=body.disabled, unlock=body.unlock,
                                          password=body.password if not reset else None, by=op)
    if regrant:
        described = await rt.changes.submit_operator_change(op, "operator.grant", {
            "name": name, "role": body.role, "project_id": None})
    if reset:
        described = await rt.changes.submit_operator_change(op, "operator.password", {
            "name": name, "password": body.password})
    return described


@routes.route("DELETE", _OP, summary="Delete an operator and their tokens (global admin; its lineage is kept)",
              response=OperatorOut, tags=("operators",))
async def delete_operator(request: web.Request, _body) -> dict:
    op = await admin(request)
    ops = runtime(request).operators
    name = request.match_info["name"]
    before = await ops.describe(name)
    await ops.delete(name, by=op)
    return {**before, "activeTokens": 0}


# ------------------------------------------------------------------ tokens
@routes.route("POST", "/tokens", summary="Create an API token (shown once; for someone else: global admin, a "
              "change request when [approvals] operators is on)", body=TokenIn, response=TokenCreated,
              tags=("tokens",), status=201, body_optional=True)
async def create_token(request: web.Request, body: TokenIn) -> dict:
    op = await operator(request)
    rt = runtime(request)
    if body.operator is not None and body.operator != op.name:
        op.require("admin")
        owner = await rt.operators.by_name(body.operator)
        out = await rt.changes.submit_operator_change(op, "operator.token", {
            "name": owner.name, "description": body.description, "ttl_days": body.expiresInDays})
        return {"token": out["_collect"]["token"], "tokenId": out["tokenId"], "operator": owner.name}
    token = await rt.operators.issue_token(op, body.description, ttl_days=body.expiresInDays)
    return {"token": token, "tokenId": token.split("_", 2)[1], "operator": op.name}


@routes.route("GET", "/tokens", summary="List API tokens (yours; admins: everyone's with all=true)",
              response=TokenList, tags=("tokens",), query={"all": {"type": "boolean"}})
async def list_tokens(request: web.Request, _body) -> dict:
    op = await operator(request)
    everyone = request.query.get("all", "").lower() in ("1", "true", "yes")
    if everyone:
        op.require("admin")        # a global admin
    return {"tokens": await runtime(request).operators.tokens(None if everyone else op.id)}


@routes.route("DELETE", r"/tokens/{token_id:[0-9a-f]{16}}", summary="Revoke an API token (at once)",
              response=WhoAmI, tags=("tokens",))
async def revoke_token(request: web.Request, _body) -> dict:
    op = await operator(request)
    await runtime(request).operators.revoke_token(request.match_info["token_id"], by=op)
    return {"name": op.name, "role": op.role, "tokenId": request.match_info["token_id"]}


# ------------------------------------------------------------------ reveal
@routes.route("POST", r"/keys/{key_id:[0-9a-f]{32}}/reveal", summary="Reveal a SECRET's current value (admin; "
              "audited as a reveal)", response=RevealOut, tags=("keys",))
async def reveal_secret(request: web.Request, _body) -> dict:
    request[AUDIT_ACTION] = "key.reveal"
    _, _, key = await key_for(request, change=True)
    rt = runtime(request)
    if key.key_type is not KeyType.SECRET:
        from server.errors import InvalidKeyType
        raise InvalidKeyType("only a SECRET has a value to reveal")
    return {"keyId": key.id, "keyVersion": key.current_version, "secretValue": await rt.keys.secret_value(key)}
