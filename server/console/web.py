"""The console's plumbing: sessions, CSRF, security headers, rendering, errors as pages.

A session is a cookie holding a short-lived operator API token issued at login
(so revocation, expiry and roles are the API's), plus server-side state keyed
by the token id: the CSRF token, the last activity (idle timeout) and flash
messages. A token that has no server-side session (an API token pasted into the
cookie, or a session this process forgot) is refused.
"""
from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from server import logs
from server.access.operators import Operator
from server.errors import ApprovalRequired, Forbidden, Sealed, SKMError, Unauthenticated, URLNotFound
from server.runtime import ERROR, OPERATOR, Runtime, runtime
from server.settings import ConsoleSettings

log = logs.get("skm.console")

PREFIX = "/console"
COOKIE = "skm_console"
LOGIN_COOKIE = "skm_console_login"     # double-submit CSRF token of the login form (no session yet)
HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    token_id: str
    csrf: str
    last_seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)


class Console:
    """Per-process console state: the live sessions."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}

    def open(self, token_id: str) -> Session:
        self._forget_idle()
        s = self.sessions[token_id] = Session(token_id, secrets.token_urlsafe(32), time.monotonic())
        return s

    def _forget_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.idle_seconds
        for tid in [t for t, s in self.sessions.items() if s.last_seen < cutoff]:
            self.sessions.pop(tid, None)


CONSOLE = web.AppKey("skm_console", Console)


class Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


@dataclass
class Ctx:
    """What a console view gets: the request, the runtime, the operator, the session, the form."""
    request: web.Request
    rt: Runtime
    op: Operator | None
    session: Session | None
    form: Any = None
    nav_pending: int = 0       # change requests waiting for this operator's decision (the nav's badge)
    roles: tuple[str, ...] = ()   # the route's roles: checked again in the project of the object it loads

    def match(self, name: str) -> str:
        return self.request.match_info[name]

    def in_scope(self, project_id: int, missing: SKMError) -> None:
        """The object of `project_id` is this operator's to see (else `missing`, exactly as if it did not
        exist) and, on a route with roles, to act on in that project (else 403)."""
        assert self.op is not None
        if not self.op.sees(project_id):
            raise missing
        if self.roles:
            self.op.require(*self.roles, project_id=project_id)

    def flash(self, kind: str, text: str) -> None:
        if self.session is not None:
            self.session.flash.append((kind, text))

    def require(self, *roles: str) -> Operator:
        assert self.op is not None
        self.op.require(*roles)
        return self.op


View = Callable[[Ctx], Awaitable[web.StreamResponse]]


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def render(c: Ctx, template: str, status: int = 200, **ctx: Any) -> web.Response:
    flash = []
    if c.session is not None:
        flash, c.session.flash = c.session.flash, []
    base = {"op": c.op, "csrf": c.session.csrf if c.session else "", "flash": flash, "path": c.request.path,
            "idle_minutes": int(c.request.config_dict[CONSOLE].settings.idle_seconds // 60),
            "nav_pending": c.nav_pending, "can": _can(c.op), "role_label": role_label(c.op)}
    return aiohttp_jinja2.render_template(template, c.request, {**base, **ctx}, status=status)


def _can(op: Operator | None) -> Callable[..., bool]:
    """For templates: `can('admin', ks.project_id)`, a role of `op` that covers that project."""
    def can(role: str, project_id: int | None = None) -> bool:
        return op is not None and op.has((role,), project_id)
    return can


def role_label(op: Operator | None) -> str:
    """The nav's role chip: the global role, or the project roles (`admin in 2 projects`)."""
    if op is None:
        return ""
    if op.role:
        return op.role
    roles = sorted({g.role for g in op.grants})
    n = len({g.project_id for g in op.grants})
    return f"{'/'.join(roles)} in {n} project{'s' if n != 1 else ''}"


def error_page(c: Ctx, e: SKMError, back: str | None = None) -> web.Response:
    c.request[ERROR] = e
    status = e.status if e.status >= 400 else 400
    return render(c, "error.html", status=status, error=e, back=back or _back_link(c.request))


def _back_link(request: web.Request) -> str | None:
    """The page the user came from, when it is one of this console's: a Referer elsewhere, or one that is not
    plain ASCII (a browser sends it percent-encoded; a stray byte reached the page as text it could not
    encode, a 500), gets no Back button."""
    ref = request.headers.get("Referer", "")
    mine = f"https://{request.host}/"
    return ref if ref.startswith(mine) and ref.isascii() and ref.isprintable() else None


def changed(c: Ctx, e: ApprovalRequired) -> web.Response:
    """A form post on an approval store became a change request: say so and show it."""
    c.request[ERROR] = e
    c.flash("info", f"This change requires approval: change request #{e.request_id} was created and waits for "
                    "a decision. Nothing has changed yet.")
    return see_other(f"{PREFIX}/approvals/{e.request_id}")


def _headers(resp: web.StreamResponse) -> web.StreamResponse:
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    return resp


def set_cookie(resp: web.StreamResponse, name: str, value: str, max_age: int | None = None) -> None:
    resp.set_cookie(name, value, path=PREFIX, secure=True, httponly=True, samesite="Strict", max_age=max_age)


def clear_cookie(resp: web.StreamResponse, name: str) -> None:
    resp.del_cookie(name, path=PREFIX, secure=True, httponly=True, samesite="Strict")


async def _session(request: web.Request) -> tuple[Operator, Session]:
    rt = runtime(request)
    console = request.config_dict[CONSOLE]
    token = request.cookies.get(COOKIE, "")
    nxt = quote(request.path_qs if request.method == "GET" else PREFIX + "/", safe="/?=&")
    if not token:
        raise Redirect(f"{PREFIX}/login?next={nxt}")
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    try:
        op = await rt.operators.authenticate_token(token)
    except Unauthenticated:
        raise Redirect(f"{PREFIX}/login?reason=ended&next={nxt}") from None
    sess = console.sessions.get(op.token_id)
    now = time.monotonic()
    if sess is None:
        # A valid token without a console session (an API token put in the cookie, or a session
        # this process no longer knows): refused, but not revoked, since it may be a CLI's token.
        raise Redirect(f"{PREFIX}/login?reason=ended&next={nxt}")
    if now - sess.last_seen > console.settings.idle_seconds:
        # Idle: end the session for good, not just here.
        console.sessions.pop(op.token_id, None)
        try:
            await rt.operators.revoke_token(op.token_id)
        except SKMError:
            pass
        raise Redirect(f"{PREFIX}/login?reason=idle&next={nxt}")
    sess.last_seen = now
    request[OPERATOR] = op      # the audit middleware records who acted
    return op, sess


def csrf_ok(expected: str, form) -> bool:
    sent = form.get("_csrf", "") if form is not None else ""
    if not isinstance(sent, str) or not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def page(view: View, *, method: str, auth: bool = True, roles: tuple[str, ...] = (),
         per_project: bool = False) -> Callable:
    """Wrap a console view: session, CSRF on POST, role check, SKMError -> an HTML page, headers.

    `roles` are global roles unless `per_project`: then a role in any project lets the view run, and
    the view's loader (`Ctx.in_scope`) checks the role again in the project of the object it acts on.
    A project-scoped operator's write to anything outside its projects answers 403, whether the object
    is another project's or does not exist (so a refusal tells nothing of other projects)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        c = Ctx(request, runtime(request), None, None, roles=roles if per_project else ())
        try:
            if auth:
                c.op, c.session = await _session(request)
            if method == "POST":
                c.form = await request.post()
                if auth and not csrf_ok(c.session.csrf, c.form):
                    raise Forbidden("the form is missing its CSRF token or it does not match this session; "
                                    "reload the page and try again")
            if roles:
                if per_project:
                    if not any(g.role in roles for g in c.op.grants):
                        raise Forbidden(f"this needs the {' or '.join(roles)} role (globally or in a project)")
                else:
                    c.require(*roles)
            if c.op is not None and method == "GET":
                c.nav_pending = await waiting_count(c)
            try:
                resp = await view(c)
            except SKMError as e:
                if e.status != 404 or isinstance(e, URLNotFound):
                    raise
                if (method == "POST" and c.op is not None and not c.op.is_global
                        and not request.path.startswith(PREFIX + "/me/")):   # /me: one's own things
                    raise Forbidden("that is not in your projects: you can change only what your projects "
                                    "hold") from e
                raise
        except Redirect as r:
            resp = see_other(r.location)
        except ApprovalRequired as e:
            resp = changed(c, e)
        except SKMError as e:
            resp = error_page(c, e)
        return _headers(resp)

    handler.__name__ = getattr(view, "__name__", "console_view")
    return handler


def decides(op: Operator, cr: dict) -> bool:
    """Whether change request `cr` (API form) waits for `op`'s decision: global admins decide operator
    management (no key store), approvers key-store changes; never one's own, and one vote each."""
    role = "admin" if cr["keyStoreId"] is None else "approver"
    return (cr["requestedBy"] != op.name and op.has((role,), cr.get("projectId"))
            and op.name not in {a["operator"] for a in cr["approvals"]})


async def waiting_for(c: Ctx, limit: int = 200) -> list[dict]:
    """Pending change requests this operator may decide (the nav's badge, the home page)."""
    svc = getattr(c.rt.changes, "approvals", None)
    if svc is None or c.op is None or not any(g.role in ("approver", "admin") for g in c.op.grants):
        return []
    pending = await svc.list(status="PENDING", limit=limit, project_ids=c.op.projects())
    return [r for r in pending if decides(c.op, r)]


async def waiting_count(c: Ctx) -> int:
    try:
        return len(await waiting_for(c))
    except SKMError:
        return 0


class ConsoleRoutes:
    """A page family's routes; registered on the management app by server.console.register()."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, Callable]] = []

    def get(self, path: str, *, auth: bool = True, roles: tuple[str, ...] = (), per_project: bool = False):
        return self._add("GET", path, auth, roles, per_project)

    def post(self, path: str, *, auth: bool = True, roles: tuple[str, ...] = (), per_project: bool = False):
        return self._add("POST", path, auth, roles, per_project)

    def _add(self, method: str, path: str, auth: bool, roles: tuple[str, ...], per_project: bool):
        def deco(view: View) -> View:
            self.entries.append((method, PREFIX + path, page(view, method=method, auth=auth, roles=roles,
                                                             per_project=per_project)))
            return view
        return deco


def form_str(c: Ctx, name: str, default: str = "", limit: int = 100_000) -> str:
    v = c.form.get(name, default) if c.form is not None else default
    return v[:limit] if isinstance(v, str) else default


def form_bool(c: Ctx, name: str) -> bool:
    return form_str(c, name) in ("on", "1", "true", "Y", "yes")


def form_int(c: Ctx, name: str, default: int, lo: int, hi: int, what: str) -> int:
    from server.errors import InvalidRequest
    raw = form_str(c, name).strip()
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise InvalidRequest(f"{what} must be a whole number from {lo} to {hi}")
    return int(raw)
