"""Management API: projects and key stores (scoped to the operator's projects)."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt import models as m
from server.api.mgmt.auth import admin, keystore_for, name_in_audit, operator
from server.api.mgmt.dataplane import data_plane_url
from server.api.routing import RouteTable
from server.errors import InvalidAppkey, InvalidRequest, NotFound
from server.runtime import runtime
import server.keys.stores  # noqa: F401,E402  (registers the keystore.delete change: the rule lives there)

routes = RouteTable("/api/v1")

_FIELDS = {"name": "name", "description": "description", "ip4AuthUse": "ip4_auth", "macAuthUse": "mac_auth",
           "certificateAuthUse": "cert_auth", "authMode": "auth_mode", "macVerification": "mac_mode",
           "approvalRequired": "approval_required", "approvalsNeeded": "approvals_needed"}


def _yn(v):
    return (v == "Y") if isinstance(v, str) and v in ("Y", "N") else v


def _project_api(request: web.Request, p) -> dict:
    # Where clients of this project call the client API (the server does not serve it on this listener).
    return {"id": p.id, "appkey": p.appkey, "name": p.name, "description": p.description,
            "createdAt": p.created_at_api, "dataPlaneUrl": data_plane_url(request, p.appkey)}


@routes.route("GET", "/projects", summary="List projects and their appkeys (yours; global roles: all)",
              response=m.ProjectList, tags=("projects",))
async def list_projects(request: web.Request, _body) -> dict:
    op = await operator(request)
    return {"projects": [_project_api(request, p) for p in await runtime(request).keys.projects()
                         if op.sees(p.id)]}


@routes.route("POST", "/projects", summary="Create a project (global admin); returns its appkey",
              body=m.ProjectCreate, response=m.ProjectOut, tags=("projects",), status=201)
async def create_project(request: web.Request, body: m.ProjectCreate) -> dict:
    await admin(request)
    p = await runtime(request).keys.create_project(body.name, description=body.description)
    await name_in_audit(request, project_id=p.id)
    return _project_api(request, p)


@routes.route("GET", r"/projects/{project_id:\d{1,12}}", summary="One project with its appkey",
              response=m.ProjectOut, tags=("projects",))
async def get_project(request: web.Request, _body) -> dict:
    op = await operator(request)
    pid = int(request.match_info["project_id"])
    p = await runtime(request).keys.project(pid)
    if p is None or not op.sees(pid):
        raise NotFound(f"no project with id {pid}")
    await name_in_audit(request, project_id=pid)
    return _project_api(request, p)


async def _target_project(request: web.Request, op, body: m.KeyStoreCreate):
    """The project a new key store goes to: `appkey` or `projectId`; without either, the first
    project for a global admin, or the one project a project admin administers."""
    rt = runtime(request)
    if body.appkey and body.projectId is not None:
        raise InvalidRequest("send appkey or projectId, not both")
    if body.appkey:
        project = await rt.keys.project_by_appkey(body.appkey)
        if project is None or not op.sees(project.id):
            raise InvalidAppkey("no project has that appkey")
        return project
    if body.projectId is not None:
        project = await rt.keys.project(body.projectId)
        if project is None or not op.sees(project.id):
            raise NotFound(f"no project with id {body.projectId}")
        return project
    if op.is_global:
        return await rt.keys.default_project()
    mine = sorted({g.project_id for g in op.grants if g.role == "admin" and g.project_id is not None})
    if len(mine) != 1:
        raise InvalidRequest("name the project: appkey or projectId")
    return await rt.keys.project(mine[0])


@routes.route("POST", "/keystores", summary="Create a key store (admin of its project)", body=m.KeyStoreCreate,
              response=m.KeyStoreOut, tags=("keystores",), status=201)
async def create_keystore(request: web.Request, body: m.KeyStoreCreate) -> dict:
    op = await operator(request)
    rt = runtime(request)
    project = await _target_project(request, op, body)
    op.require("admin", project_id=project.id)
    ks = await rt.keys.create_keystore(
        project.id, body.name, body.description, ip4_auth=body.ip4AuthUse == "Y", mac_auth=body.macAuthUse == "Y",
        cert_auth=body.certificateAuthUse == "Y", auth_mode=body.authMode, mac_mode=body.macVerification,
        approval_required=body.approvalRequired, approvals_needed=body.approvalsNeeded, actor=op.name)
    return ks.to_api()


@routes.route("GET", "/keystores", summary="List key stores (of your projects)", response=m.KeyStoreList,
              tags=("keystores",))
async def list_keystores(request: web.Request, _body) -> dict:
    op = await operator(request)
    return {"keyStoreList": [s.to_api() for s in await runtime(request).keys.keystores() if op.sees(s.project_id)]}


@routes.route("GET", r"/keystores/{keystore_id:\d{1,12}}", summary="One key store", response=m.KeyStoreOut,
              tags=("keystores",))
async def get_keystore(request: web.Request, _body) -> dict:
    _, ks = await keystore_for(request)
    # The appkey is what a client needs next (every client-API URL holds it): show it with the store.
    project = await runtime(request).keys.project(ks.project_id)
    return {**ks.to_api(), "projectId": ks.project_id, "appkey": project.appkey if project else None,
            "dataPlaneUrl": data_plane_url(request, project.appkey) if project else None}


@routes.route("DELETE", r"/keystores/{keystore_id:\d{1,12}}", summary="Delete an empty key store (409 while it "
              "holds keys; a change request on an approval store)", response=m.KeyStoreDeleted, tags=("keystores",))
async def delete_keystore(request: web.Request, _body) -> dict:
    from server.errors import Conflict
    op, ks = await keystore_for(request, change=True)
    rt = runtime(request)
    # Checked before a change request too: one that cannot apply helps nobody (the apply checks again).
    n = len(await rt.keys.key_ids(ks.id))
    if n:
        raise Conflict(f"the key store still holds {n} key{'s' if n != 1 else ''}: delete them first "
                       "(a key scheduled for deletion counts until it is purged)")
    return await rt.changes.submit(op, ks, "keystore.delete", {"keystore_id": ks.id})


@routes.route("PATCH", r"/keystores/{keystore_id:\d{1,12}}", summary="Change a key store's settings",
              body=m.KeyStoreUpdate, response=m.KeyStoreOut, tags=("keystores",))
async def update_keystore(request: web.Request, body: m.KeyStoreUpdate) -> dict:
    op, ks = await keystore_for(request, change=True)
    rt = runtime(request)
    changes = {_FIELDS[k]: _yn(v) for k, v in body.model_dump(exclude_none=True).items()}
    ks = await rt.changes.submit(op, ks, "keystore.update", {"keystore_id": ks.id, "changes": changes})
    return ks.to_api()
