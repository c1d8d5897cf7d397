"""Management API: a key store's IPv4/CIDR and MAC entries."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt import models as m
from server.api.mgmt.auth import keystore_for
from server.api.routing import RouteTable
from server.runtime import runtime

routes = RouteTable("/api/v1")
_P = r"/keystores/{keystore_id:\d{1,12}}/auths/{kind:ipv4s|macs}"


@routes.route("GET", _P, summary="List IPv4 or MAC entries", response=m.AuthEntryList, tags=("auth-data",))
async def list_entries(request: web.Request, _body) -> dict:
    _, ks = await keystore_for(request)
    return {"entries": await runtime(request).authdata.list(ks, request.match_info["kind"])}


async def _change(request: web.Request, name: str, params: dict):
    op, ks = await keystore_for(request, change=True)
    return await runtime(request).changes.submit(op, ks, name, {
        "keystore_id": ks.id, "kind": request.match_info["kind"], **params})


@routes.route("POST", _P, summary="Register an IPv4/CIDR or MAC entry", body=m.AuthEntryIn,
              response=m.AuthEntryOut, tags=("auth-data",), status=201)
async def add_entry(request: web.Request, body: m.AuthEntryIn) -> dict:
    return await _change(request, "auth.add", {"value": body.value, "description": body.description})


@routes.route("POST", _P + "/schedule-deletion", summary="Schedule an entry for deletion", body=m.AuthRefIn,
              response=m.AuthEntryOut, tags=("auth-data",))
async def schedule_entry_deletion(request: web.Request, body: m.AuthRefIn) -> dict:
    return await _change(request, "auth.schedule_deletion", {"value": body.value})


@routes.route("POST", _P + "/cancel-deletion", summary="Cancel an entry's scheduled deletion", body=m.AuthRefIn,
              response=m.AuthEntryOut, tags=("auth-data",))
async def cancel_entry_deletion(request: web.Request, body: m.AuthRefIn) -> dict:
    return await _change(request, "auth.cancel_deletion", {"value": body.value})


@routes.route("POST", _P + "/delete", summary="Delete a scheduled entry now", body=m.AuthRefIn,
              response=m.AuthEntryOut, tags=("auth-data",))
async def delete_entry(request: web.Request, body: m.AuthRefIn) -> dict:
    return await _change(request, "auth.delete", {"value": body.value})
