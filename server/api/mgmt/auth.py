"""Operator authentication for the management listener (bearer token)."""
from __future__ import annotations

from aiohttp import web

from server.access.operators import Operator
from server.errors import Sealed, Unauthenticated
from server.runtime import OPERATOR, runtime

OPEN_PATHS = frozenset({"/api/v1/openapi.json", "/healthz", "/readyz", "/metrics", "/api/v1/status"})


async def operator(request: web.Request) -> Operator:
    op = request.get(OPERATOR)
    if op is not None:
        return op
    rt = runtime(request)
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise Unauthenticated("send an operator token: Authorization: Bearer skm_...")
    op = await rt.operators.authenticate_token(auth[7:].strip())
    request[OPERATOR] = op
    return op


async def admin(request: web.Request) -> Operator:
    op = await operator(request)
    op.require("admin")
    return op
