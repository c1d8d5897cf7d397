"""Middlewares shared by both listeners: errors to envelopes, request ids, sealed state."""
from __future__ import annotations

import os

from aiohttp import web

from server import logs
from server.api import envelope
from server.api.envelope import error_response
from server.errors import SKMError
from server.runtime import ERROR

log = logs.get("skm.api")


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except SKMError as e:
        request[ERROR] = e
        log.info("request_refused", status=e.status, result=e.message, path=request.rel_url.path)
        return error_response(e)
    except web.HTTPException as e:
        err = envelope.from_http(e)
        if err is None:
            raise
        return error_response(err)
    except Exception:
        log.exception("request_failed", path=request.rel_url.path)
        return envelope.internal_error_response()


@web.middleware
async def request_context(request: web.Request, handler):
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
        rid = os.urandom(16).hex()
    logs.bind_request_id(rid)
    resp = await handler(request)
    resp.headers["X-Request-Id"] = rid
    return resp


def add_hsts(app: web.Application, max_age: int) -> None:
    """`Strict-Transport-Security` on every response of `app` (the management plane: console and API).

    The listener is TLS-only, so a browser that once reached the console over HTTPS must never be
    talked into plain HTTP for it (a downgrade would expose the session cookie and the login form).
    No includeSubDomains: the key server does not own its host's sibling names. 0 turns it off."""
    if max_age <= 0:
        return
    value = f"max-age={int(max_age)}"

    async def hsts(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Strict-Transport-Security", value)

    app.on_response_prepare.append(hsts)
