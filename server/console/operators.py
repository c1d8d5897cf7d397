"""Operators and API tokens (admins): create, disable/enable, unlock, revoke tokens."""
from __future__ import annotations

from aiohttp import web

from server.console.web import PREFIX, ConsoleRoutes, Ctx, form_str, render, see_other
from server.errors import ApprovalRequired, SKMError
from server.runtime import ERROR

routes = ConsoleRoutes()
_OP = r"/operators/{name:[A-Za-z0-9._-]{1,64}}"
ROLES = [("admin", "Admin: manages key stores, keys, auth data and operators; requests changes"),
         ("approver", "Approver: approves or denies change requests"),
         ("viewer", "Viewer: reads metadata, never secret values")]


async def _page(c: Ctx, *, status: int = 200, error: SKMError | None = None, values: dict | None = None,
                new_token: str | None = None) -> web.Response:
    return render(c, "operators.html", status=status, operators=await c.rt.operators.list(),
                  tokens=await c.rt.operators.tokens(None), roles=ROLES, error=error, values=values or {},
                  new_token=new_token)


@routes.get("/operators", roles=("admin",))
async def show(c: Ctx) -> web.Response:
    return await _page(c)


@routes.post("/operators/new", roles=("admin",))
async def create(c: Ctx) -> web.Response:
    name, role = form_str(c, "name", limit=100).strip(), form_str(c, "role", limit=16)
    try:
        password = form_str(c, "password", limit=2000)
        if password != form_str(c, "password2", limit=2000):
            from server.errors import InvalidRequest
            raise InvalidRequest("the two passwords differ")
        # Operator management goes through the change gate: lineage recorded, approval when configured.
        await c.rt.changes.submit_operator_change(c.op, "operator.create", {
            "name": name, "role": role, "project_id": None, "password": password})
    except ApprovalRequired:
        raise
    except SKMError as e:
        c.request[ERROR] = e
        return await _page(c, status=e.status, error=e, values={"name": name, "role": role})
    c.flash("ok", f"Operator {name!r} ({role}) created.")
    return see_other(PREFIX + "/operators")


@routes.post(_OP + r"/{action:disable|enable|unlock}", roles=("admin",))
async def update(c: Ctx) -> web.Response:
    name, action = c.match("name"), c.match("action")
    kw = {"disable": {"disabled": True}, "enable": {"disabled": False}, "unlock": {"unlock": True}}[action]
    await c.rt.operators.update(name, by=c.op, **kw)
    c.flash("ok", f"Operator {name!r}: {action}d." if action != "unlock" else f"Operator {name!r} unlocked.")
    return see_other(PREFIX + "/operators")


@routes.post(r"/tokens/{token_id:[0-9a-f]{16}}/revoke", roles=("admin",))
async def revoke(c: Ctx) -> web.Response:
    await c.rt.operators.revoke_token(c.match("token_id"), by=c.op)
    c.flash("ok", "Token revoked: it stops working at once.")
    return see_other(PREFIX + "/operators")


@routes.post("/tokens/new", roles=("admin",))
async def new_token(c: Ctx) -> web.Response:
    """An API token for the CLI, shown once in this response."""
    target = form_str(c, "operator", limit=64).strip()
    days = form_str(c, "days", "90", 8)
    try:
        ttl = float(days) if days else 90.0
        if not 0 < ttl <= 3650:
            raise ValueError
    except ValueError:
        from server.errors import InvalidRequest
        raise InvalidRequest("a token's lifetime is 1 to 3650 days") from None
    description = form_str(c, "description", limit=200) or "from the console"
    if target and target != c.op.name:
        owner = await c.rt.operators.by_name(target)
        out = await c.rt.changes.submit_operator_change(c.op, "operator.token", {
            "name": owner.name, "description": description, "ttl_days": ttl})
        return await _page(c, new_token=out["_collect"]["token"])
    token = await c.rt.operators.issue_token(c.op, description, ttl_days=ttl)
    return await _page(c, new_token=token)
