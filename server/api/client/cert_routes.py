"""Client API: a key store's client certificates (NHN §4.8 writes, v1.2+; §4.9 inventory, v1.0+).

Writes go through the ChangeGate (approval stores hold them). The inventory
masks the password NHN would return (see server/access/certificates.py).
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import BaseModel, Field

from server.access import certificates as certs
from server.api.client import models as m
from server.api.client.context import PREFIX, authorize_inventory, authorize_keystore, client_context
from server.api.client.crypto_routes import V12
from server.api.routing import RouteTable
from server.runtime import runtime
from server.text import SafeText

routes = RouteTable(PREFIX)


class CertCreateIn(m._In):
    keyStoreName: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=certs.MIN_PASSWORD, max_length=certs.MAX_PASSWORD,
                          json_schema_extra={"sensitive": True})   # no body HMAC over it (server/audit/middleware.py)
    lifeTime: int = Field(ge=1, le=certs.MAX_LIFETIME_DAYS)
    description: SafeText = Field(default="", max_length=1000)


class CertRefIn(m._In):
    keyStoreName: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=100)


class CertCreateOut(BaseModel):
    name: str
    description: str


class CertDeleteOut(BaseModel):
    name: str
    deletionDateTime: Optional[str] = None


async def _ks_by_name(request: web.Request, name: str):
    """The store a write names, once the request passes its client checks (manage_routes' docstring says why)."""
    ctx = await client_context(request)
    ks = await runtime(request).keys.keystore_by_name(ctx.project.id, name)
    await authorize_keystore(request, ctx, ks)
    return ctx, ks


@routes.route("POST", "/auths/certificates", summary="Issue a client certificate for a key store",
              body=CertCreateIn, response=CertCreateOut, versions=V12, tags=("client-manage",))
async def create_certificate(request: web.Request, body: CertCreateIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    rt = runtime(request)
    params = certs.create_params(rt.barrier, ks, body.name, body.password, body.lifeTime, body.description)
    row = await rt.changes.submit(ctx, ks, "cert.create", params)
    return {"name": row["name"], "description": row["description"]}


@routes.route("PUT", "/auths/certificates/delete", summary="Schedule a client certificate for deletion",
              body=CertRefIn, response=CertDeleteOut, versions=V12, tags=("client-manage",))
async def schedule_certificate_deletion(request: web.Request, body: CertRefIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    return await runtime(request).changes.submit(ctx, ks, "cert.schedule_deletion",
                                                 {"keystore_id": ks.id, "name": body.name})


@routes.route("POST", "/auths/certificates/delete", summary="Delete a scheduled client certificate now",
              body=CertRefIn, response=CertDeleteOut, versions=V12, tags=("client-manage",))
async def delete_certificate(request: web.Request, body: CertRefIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    return await runtime(request).changes.submit(ctx, ks, "cert.delete",
                                                 {"keystore_id": ks.id, "name": body.name})


@routes.route("GET", r"/keystores/{keystoreid:\d{1,12}}/certificates", summary="A key store's client certificates",
              query={"value": {"type": "string"}}, tags=("client-inventory",))
async def list_certificates(request: web.Request, _body) -> dict:
    ctx = await client_context(request)
    rt = runtime(request)
    ks = await rt.keys.keystore(int(request.match_info["keystoreid"]), project_id=ctx.project.id)
    await authorize_inventory(request, ctx, ks)
    name = request.query.get("value")
    rows = await rt.certificates.list(ks, name)
    if name is None:
        return {"certificateList": [r["name"] for r in rows]}
    return {"certificateList": rows}
