"""Login and logout: a password login issues a short-lived operator token held in the session cookie."""
from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from server.console.web import (COOKIE, CONSOLE, LOGIN_COOKIE, PREFIX, ConsoleRoutes, Ctx, clear_cookie, form_str,
                                render, see_other, set_cookie)
from server.errors import Forbidden, Sealed, SKMError
from server.runtime import ERROR, OPERATOR

routes = ConsoleRoutes()
_REASONS = {"idle": "Your session ended after a period of inactivity. Log in again.",
            "ended": "Your session has ended. Log in again.",
            "out": "You are logged out."}


def _safe_next(value: str) -> str:
    # Only paths inside the console: never an open redirect.
    if value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return PREFIX + "/"


def _login_page(c: Ctx, *, status: int = 200, error: SKMError | None = None, name: str = "") -> web.Response:
    token = secrets.token_urlsafe(32)
    reason = _REASONS.get(c.request.query.get("reason", ""))
    resp = render(c, "login.html", status=status, login_csrf=token, error=error, name=name, notice=reason,
                  next=_safe_next(c.request.query.get("next", "")))
    set_cookie(resp, LOGIN_COOKIE, token, max_age=3600)
    return resp


@routes.get("/login", auth=False)
async def login_form(c: Ctx) -> web.Response:
    return _login_page(c)


@routes.post("/login", auth=False)
async def login(c: Ctx) -> web.Response:
    rt = c.rt
    sent, expected = form_str(c, "_csrf"), c.request.cookies.get(LOGIN_COOKIE, "")
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("the login form is missing its CSRF token; reload the page and try again")
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    from server.audit import AUDIT_ACTION
    c.request[AUDIT_ACTION] = "operator.login"
    name = form_str(c, "name", limit=64)
    ip = rt.access.client_ip(c.request) if rt.access is not None else (c.request.remote or "")
    try:
        op, token = await rt.operators.login(name, form_str(c, "password", limit=1024), ip,
                                             description="web console session")
    except SKMError as e:
        c.request[ERROR] = e
        return _login_page(c, status=e.status, error=e, name=name)
    c.request[OPERATOR] = op
    # login() returns the operator without the new token's id: the id is the token's second field.
    c.request.config_dict[CONSOLE].open(token.split("_", 2)[1])
    resp = see_other(_safe_next(form_str(c, "next")))
    set_cookie(resp, COOKIE, token)
    clear_cookie(resp, LOGIN_COOKIE)
    return resp


@routes.post("/logout")
async def logout(c: Ctx) -> web.Response:
    c.request.config_dict[CONSOLE].sessions.pop(c.op.token_id, None)
    try:
        await c.rt.operators.revoke_token(c.op.token_id)
    except SKMError:
        pass
    resp = see_other(PREFIX + "/login?reason=out")
    clear_cookie(resp, COOKIE)
    return resp
