"""Management API: a key's rotation roll-out across sidecar hosts, and disabling/enabling a version.

NHN has no such calls; the client API only sees their effect (a disabled version is refused with
`Invalid Key Version Status`).
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import BaseModel

from server.api.mgmt.auth import key_for
from server.api.mgmt.models import _In
from server.api.routing import RouteTable
from server.audit import AUDIT_DETAIL
from server.keys import rollout, versions  # noqa: F401  (versions registers its ChangeGate ops)
from server.runtime import runtime

routes = RouteTable("/api/v1")
_KEY = r"/keys/{key_id:[0-9a-f]{32}}"
_VERSION = _KEY + r"/versions/{version:\d{1,9}}"


class HostHoldingOut(BaseModel):
    host: str
    fingerprint: str
    mac: Optional[str]
    version: int
    deliveredDatetime: Optional[str]
    ackDatetime: Optional[str]
    ttlSeconds: int
    reloadOk: Optional[bool]
    stale: bool


class VersionCount(BaseModel):
    version: int
    hosts: int


class RolloutOut(BaseModel):
    keyId: str
    currentVersion: int
    hostsOnCurrent: int
    hosts: int
    staleHosts: int
    versions: list[VersionCount]
    summary: str
    hostList: list[HostHoldingOut]


class VersionDisableIn(_In):
    force: bool = False


class VersionChangeOut(BaseModel):
    keyId: str
    keyVersion: int
    status: str
    changed: bool
    forced: Optional[bool] = None
    heldBy: Optional[list[str]] = None


@routes.route("GET", _KEY + "/rollout", summary="Which version of the key each sidecar host holds (stale: silent "
              "longer than its TTL)", response=RolloutOut, tags=("keys",))
async def get_rollout(request: web.Request, _body) -> dict:
    _, _, key = await key_for(request)         # a project-scoped operator sees its projects' keys only
    return await rollout.rollout(runtime(request).storage, key.id, key.current_version)


async def _version_change(request: web.Request, name: str, params: dict) -> dict:
    op, ks, key = await key_for(request, change=True)
    return await runtime(request).changes.submit_key_op(op, ks, name, key,
                                          {"version": int(request.match_info["version"]), **params})


@routes.route("POST", _VERSION + "/disable", summary="Disable a key version: decrypt/verify/export with it are "
              "refused; refused while a reporting host holds it unless force", body=VersionDisableIn,
              body_optional=True, response=VersionChangeOut, tags=("keys",))
async def disable_version(request: web.Request, body: VersionDisableIn | None) -> dict:
    force = bool(body and body.force)
    request[AUDIT_DETAIL] = {"keyVersion": int(request.match_info["version"]), **({"force": True} if force else {})}
    return await _version_change(request, "key.version_disable", {"force": force})


@routes.route("POST", _VERSION + "/enable", summary="Enable a disabled key version again", response=VersionChangeOut,
              tags=("keys",))
async def enable_version(request: web.Request, _body) -> dict:
    request[AUDIT_DETAIL] = {"keyVersion": int(request.match_info["version"])}
    return await _version_change(request, "key.version_enable", {})
