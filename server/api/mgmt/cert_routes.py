"""Management API: a key store's client certificates (issue, list, download, delete).

The download is the PKCS#12 bundle protected by the password chosen at issue;
only admins download (the bundle holds a private key).
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.access import certificates as certs
from server.api.mgmt.auth import keystore_for
from server.api.routing import RouteTable
from server.runtime import runtime
from server.text import SafeText

routes = RouteTable("/api/v1")
_P = r"/keystores/{keystore_id:\d{1,12}}/certificates"
_NAME = r"/{name:[A-Za-z0-9][A-Za-z0-9._-]{0,99}}"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CertIn(_In):
    name: str = Field(min_length=1, max_length=100, pattern=certs.NAME_RE.pattern)
    password: str = Field(min_length=certs.MIN_PASSWORD, max_length=certs.MAX_PASSWORD,
                          json_schema_extra={"sensitive": True})   # no body HMAC over it (server/audit/middleware.py)
    lifeTime: int = Field(default=365, ge=1, le=certs.MAX_LIFETIME_DAYS)
    description: SafeText = Field(default="", max_length=1000)


class CertRefIn(_In):
    name: str = Field(min_length=1, max_length=100)


class CertOut(BaseModel):
    name: str
    password: Optional[str] = None
    description: Optional[str] = None
    status: Optional[str] = None
    fingerprint: Optional[str] = None
    serialNumber: Optional[str] = None
    expirationDate: Optional[str] = None
    lastAccessDatetime: Optional[str] = None
    deletionDatetime: Optional[str] = None
    deletionDateTime: Optional[str] = None
    creationUser: Optional[str] = None
    creationDatetime: Optional[str] = None
    lastChangeUser: Optional[str] = None
    lastChangeDatetime: Optional[str] = None


class CertList(BaseModel):
    certificates: list[CertOut]


@routes.route("GET", _P, summary="List a key store's client certificates", response=CertList,
              tags=("certificates",))
async def list_certificates(request: web.Request, _body) -> dict:
    _, ks = await keystore_for(request)
    return {"certificates": await runtime(request).certificates.list(ks)}


@routes.route("POST", _P, summary="Issue a client certificate for a key store", body=CertIn, response=CertOut,
              tags=("certificates",), status=201)
async def create_certificate(request: web.Request, body: CertIn) -> dict:
    op, ks = await keystore_for(request, change=True)
    rt = runtime(request)
    params = certs.create_params(rt.barrier, ks, body.name, body.password, body.lifeTime, body.description)
    return await rt.changes.submit(op, ks, "cert.create", params)


@routes.route("GET", _P + _NAME, summary="One client certificate", response=CertOut, tags=("certificates",))
async def get_certificate(request: web.Request, _body) -> dict:
    _, ks = await keystore_for(request)
    return await runtime(request).certificates.get(ks, request.match_info["name"])


@routes.route("GET", _P + _NAME + "/bundle", summary="Download the PKCS#12 bundle (application/x-pkcs12)",
              tags=("certificates",), raw=True, media_type="application/x-pkcs12")
async def download_certificate(request: web.Request, _body) -> web.Response:
    _, ks = await keystore_for(request, change=True)      # the bundle holds a private key: admins only
    name = request.match_info["name"]
    data = await runtime(request).certificates.bundle(ks, name)
    return web.Response(body=data, content_type="application/x-pkcs12", headers={
        "Content-Disposition": f'attachment; filename="{name}.p12"', "Cache-Control": "no-store"})


async def _change(request: web.Request, change: str, body: CertRefIn):
    op, ks = await keystore_for(request, change=True)
    return await runtime(request).changes.submit(op, ks, change, {"keystore_id": ks.id, "name": body.name})


@routes.route("POST", _P + "/schedule-deletion", summary="Schedule a client certificate for deletion",
              body=CertRefIn, response=CertOut, tags=("certificates",))
async def schedule_certificate_deletion(request: web.Request, body: CertRefIn) -> dict:
    return await _change(request, "cert.schedule_deletion", body)


@routes.route("POST", _P + "/cancel-deletion", summary="Cancel a client certificate's scheduled deletion",
              body=CertRefIn, response=CertOut, tags=("certificates",))
async def cancel_certificate_deletion(request: web.Request, body: CertRefIn) -> dict:
    return await _change(request, "cert.cancel_deletion", body)


@routes.route("POST", _P + "/delete", summary="Delete a scheduled client certificate now", body=CertRefIn,
              response=CertOut, tags=("certificates",))
async def delete_certificate(request: web.Request, body: CertRefIn) -> dict:
    return await _change(request, "cert.delete", body)
