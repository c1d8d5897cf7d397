"""Change requests: pending list for approvers, my requests, detail with the diff, approve/deny/cancel."""
from __future__ import annotations

from aiohttp import web

from server.console.web import PREFIX, ConsoleRoutes, Ctx, decides, form_str, render, see_other
from server.errors import Unavailable

routes = ConsoleRoutes()
_CR = r"/approvals/{request_id:\d{1,12}}"


def service(c: Ctx):
    svc = getattr(c.rt.changes, "approvals", None)
    if svc is None:
        raise Unavailable("the approval workflow is not available on this server")
    return svc


async def _names(c: Ctx) -> dict[int, str]:
    return {s.id: s.name for s in await c.rt.keys.keystores() if c.op.sees(s.project_id)}


@routes.get("/approvals")
async def list_requests(c: Ctx) -> web.Response:
    svc = service(c)
    scope = c.op.projects()      # a project-scoped operator: its projects' requests only
    pending = await svc.list(status="PENDING", limit=200, project_ids=scope)
    waiting = [r for r in pending if decides(c.op, r)]
    mine = await svc.list(requested_by=c.op.name, limit=100, project_ids=scope)
    recent = await svc.list(limit=50, project_ids=scope)
    return render(c, "approvals.html", waiting=waiting, pending=pending, mine=mine, recent=recent,
                  stores=await _names(c), is_approver=any(g.role == "approver" for g in c.op.grants))


@routes.get(_CR)
async def show_request(c: Ctx) -> web.Response:
    svc = service(c)
    await svc.expire_due()
    cr = await svc.get(int(c.match("request_id")), by=c.op)     # another project's: as if it did not exist
    can_decide = cr["status"] == "PENDING" and decides(c.op, cr)
    # A request edited in the database is never approved, but an approver may deny it to end it.
    can_deny = can_decide or (cr["status"] == "INVALID" and decides(c.op, cr))
    can_cancel = cr["status"] == "PENDING" and cr["requestedBy"] == c.op.name
    return render(c, "approval.html", cr=cr, can_decide=can_decide, can_deny=can_deny, can_cancel=can_cancel,
                  stores=await _names(c))


async def _decide(c: Ctx, verb: str) -> web.Response:
    svc = service(c)
    rid = int(c.match("request_id"))
    comment = form_str(c, "comment", limit=1000)
    if verb == "approve":
        cr = await svc.approve(c.op, rid, comment)
    elif verb == "deny":
        cr = await svc.deny(c.op, rid, comment)
    else:
        cr = await svc.cancel(c.op, rid)
    msg = {"APPLIED": "Approved and applied.", "FAILED": f"Approved, but applying failed: {cr['reason']}",
           "PENDING": "Approval recorded; the request needs more approvals.", "DENIED": "Denied: nothing changes.",
           "CANCELLED": "Cancelled: nothing changes."}.get(cr["status"], cr["status"])
    if verb == "deny":
        msg = "Denied: nothing changes."      # an edited request stays marked INVALID once denied
    c.flash("error" if cr["status"] == "FAILED" else "ok", f"Change request #{rid}: {msg}")
    if cr["status"] == "APPLIED" and cr.get("operation") == "keystore.delete":
        return see_other(f"{PREFIX}/keystores")      # the request went with its store
    return see_other(f"{PREFIX}/approvals/{rid}")


@routes.post(_CR + "/approve")
async def approve(c: Ctx) -> web.Response:
    return await _decide(c, "approve")


@routes.post(_CR + "/deny")
async def deny(c: Ctx) -> web.Response:
    return await _decide(c, "deny")


@routes.post(_CR + "/cancel")
async def cancel(c: Ctx) -> web.Response:
    return await _decide(c, "cancel")
