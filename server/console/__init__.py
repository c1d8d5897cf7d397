"""The web console: server-rendered pages on the management listener under /console/.

`install(rt)` (called by server.app at start) leaves a function in
rt.extra["console"] that build_apps calls with the management app. Views are
split by page family; every one calls the same services as the management API
(rt.keys, rt.authdata, rt.changes.submit, rt.certificates, approvals, audit,
rt.operators) and never holds a rule of its own.
"""
from __future__ import annotations

import jinja2
from aiohttp import web as aioweb   # `web` would be shadowed by the server.console.web submodule

from server.console.web import CONSOLE, HERE, PREFIX, SECURITY_HEADERS, Console
from server.settings import ConsoleSettings

STATIC = HERE / "static"
_TYPES = {".css": "text/css", ".js": "application/javascript", ".svg": "image/svg+xml"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    # Loaded once: a fixed set of names, so no path from a request ever reaches the file system.
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in _TYPES}


def register(app: aioweb.Application) -> None:
    import aiohttp_jinja2

    from server.console import (approvals, audit, auth, authdata, connect, dashboard, keys, keystores, me, operators,
                                projects, usage)
    from server.console.filters import install_filters
    from server.console.web import page
    from server.errors import URLNotFound
    from server.runtime import RUNTIME

    rt = app[RUNTIME]
    app[CONSOLE] = rt.extra.setdefault("console_state", Console(ConsoleSettings.from_config(rt.config)))
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                               autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                               undefined=jinja2.StrictUndefined)
    install_filters(env)
    for family in (auth, dashboard, projects, keystores, keys, authdata, approvals, audit, operators, usage, connect,
                   me):
        for method, path, handler in family.routes.entries:
            app.router.add_route(method, path, handler)
    files = _static_files()

    async def static(request: aioweb.Request) -> aioweb.Response:
        found = files.get(request.match_info["name"])
        if found is None:
            raise aioweb.HTTPNotFound()
        body, ctype = found
        return aioweb.Response(body=body, content_type=ctype,
                            headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=300"})

    async def home(_request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(status=303, headers={"Location": PREFIX + "/", **SECURITY_HEADERS})

    async def missing(_c) -> aioweb.Response:
        raise URLNotFound("there is no console page at this address")

    app.router.add_get(PREFIX + "/static/{name}", static)
    app.router.add_get("/", home)
    app.router.add_get(PREFIX, home)
    # Last: any other console address is a page saying so (for a logged-in operator), not a JSON envelope.
    app.router.add_get(PREFIX + "/{tail:.*}", page(missing, method="GET"))


def install(rt) -> None:
    rt.extra["console"] = register
