"""Management API: data-plane usage (requests and denials over time) from the per-minute rollup."""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import BaseModel

from server.api.mgmt.auth import name_in_audit, operator
from server.api.params import int_param
from server.api.routing import RouteTable
from server.errors import InvalidRequest, Unavailable
from server.runtime import runtime

routes = RouteTable("/api/v1")


class Bucket(BaseModel):
    start: str
    ok: int
    denied: int
    error: int


class UsageOut(BaseModel):
    range: str
    bucketMinutes: int
    keyStoreId: Optional[int] = None
    keyId: Optional[str] = None
    buckets: list[Bucket]
    totals: dict[str, int]


async def usage_for(rt, op, *, range_: str, keystore_id: int | None, key_id: str | None) -> dict:
    """The usage series an operator may see: a key or store is resolved first (404 when it is not there or
    outside the operator's projects); with neither, every store the operator may see."""
    usage = rt.extra.get("usage")
    if usage is None:
        raise Unavailable("usage counting is off on this server (SKM_USAGE_ENABLED)")
    scope = op.projects()
    ids = None
    if key_id is not None:
        key = await rt.keys.key(key_id)
        if keystore_id is not None and key.keystore_id != keystore_id:
            raise InvalidRequest("that key is not in that key store")
        keystore_id = key.keystore_id
    if keystore_id is not None:
        ks = await rt.keys.keystore(keystore_id)
        if scope is not None and ks.project_id not in scope:
            from server.errors import NotFound
            raise NotFound("no such key store")
    elif scope is not None:
        ids = [s.id for s in await rt.keys.keystores() if s.project_id in scope]
    out = await usage.series(range_=range_, keystore_id=keystore_id, keystore_ids=ids, key_id=key_id)
    return {**out, "keyStoreId": keystore_id, "keyId": key_id}


@routes.route("GET", "/usage", summary="Client requests and denials over time (per key store or key)",
              response=UsageOut, tags=("usage",),
              query={"keyStoreId": {"type": "integer"}, "keyId": {"type": "string"},
                     "range": {"type": "string", "enum": ["hour", "day", "month"]}})
async def usage(request: web.Request, _body) -> dict:
    op = await operator(request)
    q = request.query
    ks = int_param(q, "keyStoreId", None)
    key_id = q.get("keyId") or None
    if key_id is not None and (len(key_id) != 32 or any(ch not in "0123456789abcdef" for ch in key_id)):
        raise InvalidRequest("keyId must be a key id (32 hex digits)")
    out = await usage_for(runtime(request), op, range_=q.get("range") or "day",
                          keystore_id=int(ks) if ks else None, key_id=key_id)
    await name_in_audit(request, keystore_id=out["keyStoreId"], key_id=out["keyId"])
    return out
