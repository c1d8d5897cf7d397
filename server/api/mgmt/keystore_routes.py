"""Management API: projects and key stores."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt import models as m
from server.api.mgmt.auth import admin, operator
from server.api.routing import RouteTable
from server.runtime import runtime

routes = RouteTable("/api/v1")

_FIELDS = {"name": "name", "description": "description", "ip4AuthUse": "ip4_auth", "macAuthUse": "mac_auth",
           "certificateAuthUse": "cert_auth", "authMode": "auth_mode", "macVerification": "mac_mode",
           "approvalRequired": "approval_required", "approvalsNeeded": "approvals_needed"}


def _yn(v):
    return (v == "Y") if isinstance(v, str) and v in ("Y", "N") else v


@routes.route("GET", "/projects", summary="List projects and their appkeys", response=m.ProjectList,
              tags=("projects",))
async def list_projects(request: web.Request, _body) -> dict:
    await operator(request)
    return {"projects": [{"id": p.id, "appkey": p.appkey, "name": p.name}
                         for p in await runtime(request).keys.projects()]}


@routes.route("POST", "/keystores", summary="Create a key store", body=m.KeyStoreCreate, response=m.KeyStoreOut,
              tags=("keystores",), status=201)
async def create_keystore(request: web.Request, body: m.KeyStoreCreate) -> dict:
    op = await admin(request)
    rt = runtime(request)
    if body.appkey:
        project = await rt.keys.project_by_appkey(body.appkey)
        if project is None:
            from server.errors import InvalidAppkey
            raise InvalidAppkey("no project has that appkey")
    else:
        project = await rt.keys.default_project()
    ks = await rt.keys.create_keystore(
        project.id, body.name, body.description, ip4_auth=body.ip4AuthUse == "Y", mac_auth=body.macAuthUse == "Y",
        cert_auth=body.certificateAuthUse == "Y", auth_mode=body.authMode, mac_mode=body.macVerification,
        approval_required=body.approvalRequired, approvals_needed=body.approvalsNeeded, actor=op.name)
    return ks.to_api()


@routes.route("GET", "/keystores", summary="List key stores", response=m.KeyStoreList, tags=("keystores",))
async def list_keystores(request: web.Request, _body) -> dict:
    await operator(request)
    return {"keyStoreList": [s.to_api() for s in await runtime(request).keys.keystores()]}


@routes.route("GET", r"/keystores/{keystore_id:\d{1,12}}", summary="One key store", response=m.KeyStoreOut,
              tags=("keystores",))
async def get_keystore(request: web.Request, _body) -> dict:
    await operator(request)
    rt = runtime(request)
    ks = await rt.keys.keystore(int(request.match_info["keystore_id"]))
    # The appkey is what a client needs next (its URL holds it): show it with the store.
    project = next((p for p in await rt.keys.projects() if p.id == ks.project_id), None)
    return {**ks.to_api(), "projectId": ks.project_id, "appkey": project.appkey if project else None}


@routes.route("DELETE", r"/keystores/{keystore_id:\d{1,12}}", summary="Delete an empty key store (409 while it "
              "holds keys; a change request on an approval store)", response=m.KeyStoreDeleted, tags=("keystores",))
async def delete_keystore(request: web.Request, _body) -> dict:
    from server.keys.keystore_delete import check_deletable
    op = await admin(request)
    rt = runtime(request)
    ks = await rt.keys.keystore(int(request.match_info["keystore_id"]))
    await check_deletable(rt.keys, ks)      # before a change request: one that cannot apply helps nobody
    return await rt.changes.submit(op.name, ks, "keystore.delete", {"keystore_id": ks.id})


@routes.route("PATCH", r"/keystores/{keystore_id:\d{1,12}}", summary="Change a key store's settings",
              body=m.KeyStoreUpdate, response=m.KeyStoreOut, tags=("keystores",))
async def update_keystore(request: web.Request, body: m.KeyStoreUpdate) -> dict:
    op = await admin(request)
    rt = runtime(request)
    ks = await rt.keys.keystore(int(request.match_info["keystore_id"]))
    changes = {_FIELDS[k]: _yn(v) for k, v in body.model_dump(exclude_none=True).items()}
    ks = await rt.changes.submit(op.name, ks, "keystore.update", {"keystore_id": ks.id, "changes": changes})
    return ks.to_api()
