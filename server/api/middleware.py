"""Middlewares shared by both listeners: errors to envelopes, request ids, sealed state."""
from __future__ import annotations

import os

import structlog
from aiohttp import web

from server import logs
from server.errors import MethodNotAllowed, PayloadTooLarge, SKMError, URLNotFound
from server.runtime import ERROR

log = logs.get("skm.api")

_INTERNAL = {"header": {"resultCode": -9999, "resultMessage": "Internal Error", "isSuccessful": False}, "body": None}


def error_response(err: SKMError) -> web.Response:
    from server.api.routing import _dumps
    return web.Response(text=_dumps(err.envelope()), status=err.status, content_type="application/json")


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except SKMError as e:
        request[ERROR] = e
        log.info("request_refused", status=e.status, result=e.message, path=request.rel_url.path)
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("the request body is larger than this server accepts"))
    except web.HTTPNotFound:
        return error_response(URLNotFound("no such endpoint; check the path and API version"))
    except web.HTTPMethodNotAllowed as e:
        return error_response(MethodNotAllowed(f"use {', '.join(sorted(e.allowed_methods))}"))
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(SKMError(e.reason, message=e.reason))
        raise
    except Exception:
        # Never echo an exception's text: it may hold anything.
        log.exception("request_failed", path=request.rel_url.path)
        from server.api.routing import _dumps
        return web.Response(text=_dumps(_INTERNAL), status=500, content_type="application/json")


@web.middleware
async def request_context(request: web.Request, handler):
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
        rid = os.urandom(16).hex()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=rid)
    resp = await handler(request)
    resp.headers["X-Request-Id"] = rid
    return resp
