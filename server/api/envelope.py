"""NHN's JSON envelope as bytes on the wire: success, errors, aiohttp's own HTTP errors.

Light on purpose (aiohttp, server.errors and server.jsontext only): the sidecar answers with the same
envelopes without loading the key server's runtime or API stack.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from server.errors import MethodNotAllowed, PayloadTooLarge, SKMError, URLNotFound
from server.jsontext import encoder

SUCCESS_HEADER = {"resultCode": 0, "resultMessage": "success", "isSuccessful": True}
INTERNAL = {"header": {"resultCode": -9999, "resultMessage": "Internal Error", "isSuccessful": False}, "body": None}
JSON_UTF8 = "application/json; charset=utf-8"     # what web.Response says for content_type="application/json"
dumps = encoder(ensure_ascii=False)


def ok_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps({"header": SUCCESS_HEADER, "body": body}), status=status,
                        content_type="application/json")


def error_response(err: SKMError) -> web.Response:
    return web.Response(text=dumps(err.envelope()), status=err.status, content_type="application/json")


def internal_error_response() -> web.Response:
    """A 500 that says nothing of the exception: its text may hold anything."""
    return web.Response(text=dumps(INTERNAL), status=500, content_type="application/json")


def from_http(e: web.HTTPException) -> SKMError | None:
    """aiohttp's own HTTP error (no route, wrong method, body too large) as ours; None when not an error."""
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("the request body is larger than this server accepts")
    if isinstance(e, web.HTTPNotFound):
        return URLNotFound("no such endpoint; check the path and API version")
    if isinstance(e, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"use {', '.join(sorted(e.allowed_methods))}")
    if e.status >= 400:
        return SKMError(e.reason, message=e.reason)
    return None
