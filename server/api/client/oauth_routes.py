"""`/oauth2/token/create` and `/oauth2/token/revoke` on the data-plane listener (NHN's token endpoint).

Basic auth with a user access key, form body, and an unenveloped success body
exactly as NHN's (`access_token`, `token_type`, `expires_in`); failures are the
project's error envelope with 400/401 like every other endpoint here.
"""
from __future__ import annotations

from aiohttp import web

from server.access.callers import TOKEN_TTL_MAX, TOKEN_TTL_MIN, parse_basic
from server.api.routing import RouteTable
from server.errors import InvalidRequest, Sealed, Unauthenticated, UnsupportedMediaType
from server.runtime import runtime

routes = RouteTable("")
FORM = "application/x-www-form-urlencoded"
# NHN's OAuth token responses: plain JSON, not the result envelope.
TOKEN_SCHEMA = {"type": "object", "required": ["access_token", "token_type", "expires_in"],
                "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"},
                               "expires_in": {"type": "integer"}}}
REVOKED_SCHEMA = {"type": "object"}


async def _form(request: web.Request) -> dict:
    if request.content_type != FORM:
        raise UnsupportedMediaType(f"send the body as {FORM}")
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def _access_key(request: web.Request):
    rt = runtime(request)
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    creds = parse_basic(request.headers.get("Authorization", ""))
    if creds is None:
        raise Unauthenticated("send the user access key as Authorization: Basic base64(accessKeyId:secretAccessKey)")
    try:
        return await rt.callers.verify_key(*creds)
    except Unauthenticated:
        if rt.metrics is not None:
            rt.metrics.denials.labels("caller").inc()
        raise


@routes.route("POST", "/oauth2/token/create", summary="Issue a v1.3 bearer token from a user access key",
              tags=("oauth",), raw=True, enveloped=False, response_schema=TOKEN_SCHEMA)
async def create_token(request: web.Request, _body) -> web.Response:
    key = await _access_key(request)
    form = await _form(request)
    if form.get("grant_type") != "client_credentials":
        raise InvalidRequest("grant_type must be client_credentials")
    raw = form.get("expires_in", str(TOKEN_TTL_MAX))
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
        raise InvalidRequest(f"expires_in must be a whole number of seconds from {TOKEN_TTL_MIN} to {TOKEN_TTL_MAX}")
    out = await runtime(request).callers.issue_token(key, int(raw))
    return web.json_response(out, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@routes.route("POST", "/oauth2/token/revoke", summary="Revoke a v1.3 bearer token", tags=("oauth",), raw=True,
              enveloped=False, response_schema=REVOKED_SCHEMA)
async def revoke_token(request: web.Request, _body) -> web.Response:
    key = await _access_key(request)
    form = await _form(request)
    token = form.get("token", "")
    if not token:
        raise InvalidRequest("send the token to revoke as the form field token")
    await runtime(request).callers.revoke_token(key, token)
    return web.json_response({}, headers={"Cache-Control": "no-store"})
