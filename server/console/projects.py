"""Projects: each with its appkey and data-plane URL (several teams, one server); global admins create them.

Creation goes through the same domain function as `POST /api/v1/projects` and `skm project create`
(`rt.keys.create_project`), after the same request model's checks.
"""
from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from server.api.mgmt.models import ProjectCreate
from server.api.routing import describe_validation_error
from server.audit.middleware import AUDIT_ACTION, AUDIT_DETAIL
from server.console.connect import data_url
from server.console.web import PREFIX, ConsoleRoutes, Ctx, form_str, render, see_other
from server.errors import InvalidRequest, SKMError
from server.runtime import ERROR

routes = ConsoleRoutes()


async def _page(c: Ctx, *, status: int = 200, error: SKMError | None = None, values: dict | None = None,
                created: int | None = None) -> web.Response:
    projects = [p for p in await c.rt.keys.projects() if c.op.sees(p.id)]
    counts: dict[int, int] = {}
    for s in await c.rt.keys.keystores():
        counts[s.project_id] = counts.get(s.project_id, 0) + 1
    base = data_url(c)
    rows = [{"p": p, "url": f"{base}/keymanager/v1.0/appkey/{p.appkey}", "stores": counts.get(p.id, 0),
             "roles": sorted(c.op.roles_in(p.id))} for p in projects]
    return render(c, "projects.html", status=status, rows=rows, error=error, values=values or {},
                  created=created, can_create=c.op.has(("admin",)))


@routes.get("/projects")
async def list_projects(c: Ctx) -> web.Response:
    created = c.request.query.get("created", "")
    return await _page(c, created=int(created) if created.isascii() and created.isdigit() and len(created) < 13
                       else None)


@routes.post("/projects/new", roles=("admin",))
async def create_project(c: Ctx) -> web.Response:
    """A new project and its appkey (global admins: a project is installation-wide)."""
    c.request[AUDIT_ACTION] = "project.create"
    values = {"name": form_str(c, "name", limit=200).strip(), "description": form_str(c, "description", limit=2000)}
    try:
        try:
            body = ProjectCreate(**values)
        except ValidationError as e:
            raise InvalidRequest(describe_validation_error(e)) from None
        p = await c.rt.keys.create_project(body.name, description=body.description)
    except SKMError as e:
        c.request[ERROR] = e
        return await _page(c, status=e.status, error=e, values=values)
    c.request[AUDIT_DETAIL] = {"projectId": p.id, "projectName": p.name}
    c.flash("ok", f"Project {p.name!r} created. Its appkey is {p.appkey}.")
    return see_other(f"{PREFIX}/projects?created={p.id}")
