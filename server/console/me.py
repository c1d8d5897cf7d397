"""Self-service for every role: change my password, list and revoke my API tokens and access keys."""
from __future__ import annotations

from aiohttp import web

from server.console.web import CONSOLE, PREFIX, ConsoleRoutes, Ctx, form_str, render, see_other
from server.errors import InvalidRequest, SKMError
from server.runtime import ERROR

routes = ConsoleRoutes()


async def _page(c: Ctx, *, status: int = 200, error: SKMError | None = None) -> web.Response:
    tokens = await c.rt.operators.tokens(c.op.id)
    keys = [k.to_api() for k in await c.rt.callers.keys(c.op.id)] if c.rt.callers is not None else None
    return render(c, "me.html", status=status, tokens=tokens, access_keys=keys, error=error,
                  session_token=c.op.token_id)


@routes.get("/me")
async def show(c: Ctx) -> web.Response:
    return await _page(c)


@routes.post("/me/password")
async def change_password(c: Ctx) -> web.Response:
    """The current password is checked like a login (a wrong one counts toward the lockout)."""
    try:
        new = form_str(c, "new_password", limit=2000)
        if new != form_str(c, "new_password2", limit=2000):
            raise InvalidRequest("the two new passwords differ")
        ip = c.rt.access.client_ip(c.request) if c.rt.access is not None else (c.request.remote or "")
        await c.rt.operators.check_login(c.op.name, form_str(c, "current_password", limit=2000), ip)
        await c.rt.operators.update(c.op.name, password=new)
    except SKMError as e:
        c.request[ERROR] = e
        return await _page(c, status=e.status, error=e)
    c.flash("ok", "Password changed.")
    return see_other(PREFIX + "/me")


@routes.post(r"/me/tokens/{token_id:[0-9a-f]{16}}/revoke")
async def revoke_token(c: Ctx) -> web.Response:
    tid = c.match("token_id")
    await c.rt.operators.revoke_token(tid, by=c.op if c.op.role != "admin" else _self_only(c))
    if tid == c.op.token_id:
        c.request.config_dict[CONSOLE].sessions.pop(tid, None)
        return see_other(PREFIX + "/login?reason=out")
    c.flash("ok", "Token revoked: it stops working at once.")
    return see_other(PREFIX + "/me")


def _self_only(c: Ctx):
    # On this page even an admin revokes only their own tokens (the Operators page revokes anyone's).
    from dataclasses import replace
    return replace(c.op, role="viewer")


@routes.post(r"/me/access-keys/{key_id:[A-Za-z0-9_-]{1,64}}/delete")
async def delete_access_key(c: Ctx) -> web.Response:
    if c.rt.callers is None:
        raise InvalidRequest("access keys are not available on this server")
    key_id = c.match("key_id")
    mine = {k.id for k in await c.rt.callers.keys(c.op.id)}
    if key_id not in mine:
        from server.errors import NotFound
        raise NotFound("no such access key of yours")
    await c.rt.callers.delete_key(key_id, c.op)
    c.flash("ok", "Access key deleted: its tokens stop working at once.")
    return see_other(PREFIX + "/me")
