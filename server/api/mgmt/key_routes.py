"""Management API: keys of a key store, versions, rotation, deletion."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt import models as m
from server.api.mgmt.auth import key_for, keystore_for
from server.api.params import int_param
from server.api.routing import RouteTable
from server.runtime import runtime

routes = RouteTable("/api/v1")
_KS = r"/keystores/{keystore_id:\d{1,12}}"
_KEY = r"/keys/{key_id:[0-9a-f]{32}}"


@routes.route("POST", _KS + "/keys", summary="Create a key (SECRET, SYMMETRIC_KEY or ASYMMETRIC_KEY)",
              body=m.KeyCreate, response=m.KeyOut, tags=("keys",), status=201)
async def create_key(request: web.Request, body: m.KeyCreate) -> dict:
    op, ks = await keystore_for(request, change=True)
    rt = runtime(request)
    key = await rt.changes.submit(op, ks, "key.create", {
        "keystore_id": ks.id, "key_type": body.keyType, "name": body.name, "description": body.description,
        "key_spec": body.keySpec, "auto_rotation_days": body.autoRotationPeriod, "exportable": body.exportable,
        "secret_value": body.secretValue})
    return key.to_api()


@routes.route("GET", _KS + "/keys", summary="List a key store's keys", response=m.KeyList, tags=("keys",),
              query={"type": {"type": "string"}, "status": {"type": "string"}, "name": {"type": "string"},
                     "page": {"type": "integer"}, "pageSize": {"type": "integer"},
                     "after": {"type": "string", "pattern": "^[0-9a-f]{32}$"}})
async def list_keys(request: web.Request, _body) -> dict:
    from server.errors import InvalidRequest
    _, ks = await keystore_for(request)
    rt = runtime(request)
    status = request.query.get("status")
    if status not in (None, "active", "inactive"):
        raise InvalidRequest("status must be active or inactive")
    keys = await rt.keys.keys(ks.id, key_type=request.query.get("type") or None,
                              name=request.query.get("name") or None, status=status,
                              page=int_param(request.query, "page", 1, 1, 10**6),
                              page_size=int_param(request.query, "pageSize", 100, 1, 1000),
                              after=request.query.get("after") or None)
    return {"keyList": [k.to_api() for k in keys]}


@routes.route("GET", _KEY, summary="A key's metadata with its versions", response=m.KeyOut, tags=("keys",))
async def get_key(request: web.Request, _body) -> dict:
    _, _, key = await key_for(request, with_versions=True)
    return key.to_api()


async def _key_op(request: web.Request, name: str, params: dict | None = None):
    op, ks, key = await key_for(request, change=True)
    return key, await runtime(request).changes.submit_key_op(op, ks, name, key, params)


@routes.route("PATCH", _KEY, summary="Change a key's description or rotation period", body=m.KeyUpdate,
              response=m.KeyOut, tags=("keys",))
async def update_key(request: web.Request, body: m.KeyUpdate) -> dict:
    _, key = await _key_op(request, "key.update", {"description": body.description,
                                                   "auto_rotation_days": body.autoRotationPeriod})
    return key.to_api()


@routes.route("POST", _KEY + "/rotate", summary="Rotate now (a SECRET takes its new value here)",
              body=m.KeyRotate, body_optional=True, response=m.KeyOut, tags=("keys",))
async def rotate_key(request: web.Request, body: m.KeyRotate | None) -> dict:
    params = {"secretValue": body.secretValue} if body and body.secretValue is not None else {}
    _, key = await _key_op(request, "key.rotate", params)
    return key.to_api()


@routes.route("POST", _KEY + "/schedule-deletion", summary="Schedule deletion (default 7 days)", response=m.KeyOut,
              tags=("keys",))
async def schedule_deletion(request: web.Request, _body) -> dict:
    _, key = await _key_op(request, "key.schedule_deletion")
    return key.to_api()


@routes.route("POST", _KEY + "/cancel-deletion", summary="Cancel a scheduled deletion", response=m.KeyOut,
              tags=("keys",))
async def cancel_deletion(request: web.Request, _body) -> dict:
    _, key = await _key_op(request, "key.cancel_deletion")
    return key.to_api()


@routes.route("DELETE", _KEY, summary="Delete now (only a key scheduled for deletion)", response=m.DeletedOut,
              tags=("keys",))
async def delete_key(request: web.Request, _body) -> dict:
    key, when = await _key_op(request, "key.delete")
    return {"keyId": key.id, "deletionDateTime": when}
