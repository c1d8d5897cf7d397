"""Management API: operators, login, API tokens, whoami, and the console's secret reveal."""
from __future__ import annotations

from typing import Literal, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.access.operators import MAX_PASSWORD
from server.api.mgmt.auth import admin, operator
from server.api.routing import RouteTable
from server.audit import AUDIT_ACTION, AUDIT_DETAIL
from server.errors import Forbidden, InvalidRequest, Sealed, Unauthenticated
from server.keys.model import KeyType
from server.runtime import OPERATOR, runtime
from server.text import SafeText

routes = RouteTable("/api/v1")
_OP = r"/operators/{name:[A-Za-z0-9._-]{1,64}}"
Role = Literal["admin", "approver", "viewer"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(_In):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD)
    description: SafeText = Field(default="login", max_length=200)


class LoginOut(BaseModel):
    token: str
    operator: str
    role: str
    expiresInHours: float


class OperatorIn(_In):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    role: Role
    password: Optional[str] = Field(default=None, max_length=MAX_PASSWORD,
                                    description="optional: an operator without one uses tokens only")


class OperatorUpdate(_In):
    role: Optional[Role] = None
    disabled: Optional[bool] = None
    password: Optional[str] = Field(default=None, max_length=MAX_PASSWORD)
    currentPassword: Optional[str] = Field(default=None, max_length=MAX_PASSWORD,
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


class OperatorList(BaseModel):
    operators: list[OperatorOut]


class WhoAmI(BaseModel):
    name: str
    role: str
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
    return {"token": token, "operator": op.name, "role": op.role,
            "expiresInHours": rt.operators.settings.token_ttl_hours}


@routes.route("GET", "/whoami", summary="The operator this token belongs to", response=WhoAmI, tags=("operators",))
async def whoami(request: web.Request, _body) -> dict:
    op = await operator(request)
    return {"name": op.name, "role": op.role, "tokenId": op.token_id}


# --------------------------------------------------------------- operators
@routes.route("GET", "/operators", summary="List operators", response=OperatorList, tags=("operators",))
async def list_operators(request: web.Request, _body) -> dict:
    await operator(request)
    return {"operators": await runtime(request).operators.list()}


@routes.route("POST", "/operators", summary="Create an operator (admin)", body=OperatorIn, response=OperatorOut,
              tags=("operators",), status=201)
async def create_operator(request: web.Request, body: OperatorIn) -> dict:
    await admin(request)
    ops = runtime(request).operators
    await ops.create(body.name, body.role, password=body.password)
    return await ops.describe(body.name)


@routes.route("GET", _OP, summary="One operator", response=OperatorOut, tags=("operators",))
async def get_operator(request: web.Request, _body) -> dict:
    await operator(request)
    return await runtime(request).operators.describe(request.match_info["name"])


@routes.route("PATCH", _OP, summary="Change an operator's role, password, disabled flag or lockout",
              body=OperatorUpdate, response=OperatorOut, tags=("operators",))
async def update_operator(request: web.Request, body: OperatorUpdate) -> dict:
    op = await operator(request)
    rt = runtime(request)
    name = request.match_info["name"]
    if op.role != "admin":
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
    return await rt.operators.update(name, role=body.role, disabled=body.disabled, password=body.password,
                                     unlock=body.unlock, by=op)


@routes.route("DELETE", _OP, summary="Delete an operator and their tokens (admin)", response=OperatorOut,
              tags=("operators",))
async def delete_operator(request: web.Request, _body) -> dict:
    op = await admin(request)
    ops = runtime(request).operators
    name = request.match_info["name"]
    before = await ops.describe(name)
    await ops.delete(name, by=op)
    return {**before, "activeTokens": 0}


# ------------------------------------------------------------------ tokens
@routes.route("POST", "/tokens", summary="Create an API token (shown once)", body=TokenIn, response=TokenCreated,
              tags=("tokens",), status=201, body_optional=True)
async def create_token(request: web.Request, body: TokenIn) -> dict:
    op = await operator(request)
    ops = runtime(request).operators
    owner = op
    if body.operator is not None and body.operator != op.name:
        op.require("admin")
        owner = await ops.by_name(body.operator)
    token = await ops.issue_token(owner, body.description, ttl_days=body.expiresInDays)
    return {"token": token, "tokenId": token.split("_", 2)[1], "operator": owner.name}


@routes.route("GET", "/tokens", summary="List API tokens (yours; admins: everyone's with all=true)",
              response=TokenList, tags=("tokens",), query={"all": {"type": "boolean"}})
async def list_tokens(request: web.Request, _body) -> dict:
    op = await operator(request)
    everyone = request.query.get("all", "").lower() in ("1", "true", "yes")
    if everyone:
        op.require("admin")
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
    await admin(request)
    rt = runtime(request)
    key = await rt.keys.key(request.match_info["key_id"])
    if key.key_type is not KeyType.SECRET:
        from server.errors import InvalidKeyType
        raise InvalidKeyType("only a SECRET has a value to reveal")
    return {"keyId": key.id, "keyVersion": key.current_version, "secretValue": await rt.keys.secret_value(key)}
