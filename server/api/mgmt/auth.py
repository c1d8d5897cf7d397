"""Operator authentication for the management listener (bearer token), and project scoping.

A global role covers every project; a project role covers that project only. Whatever an
operator may not see answers exactly as if it did not exist (404), so a project-scoped
operator cannot even learn that another project's key stores, keys or requests exist; what it
sees but may not change answers 403.
"""
from __future__ import annotations

from aiohttp import web

from server.access.operators import Operator
from server.audit.middleware import AUDIT_KEY, AUDIT_KEYSTORE, AUDIT_PROJECT
from server.errors import InvalidKeyId, KeyStoreNotFound, Sealed, SKMError, Unauthenticated
from server.keys.model import Key, KeyStore
from server.runtime import OPERATOR, request_value, runtime

OPEN_PATHS = frozenset({"/api/v1/openapi.json", "/healthz", "/readyz", "/metrics", "/api/v1/status"})


async def operator(request: web.Request) -> Operator:
    op = request_value(request, OPERATOR)
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
    """A global admin (installation-wide actions: projects, operators, the barrier)."""
    op = await operator(request)
    op.require("admin")
    return op


async def keystore_for(request: web.Request, *, change: bool = False) -> tuple[Operator, KeyStore]:
    """The operator and the key store of `{keystore_id}`: visible to them, and theirs to change
    (admin of its project) when `change`."""
    op = await operator(request)
    ks = await runtime(request).keys.keystore(int(request.match_info["keystore_id"]))
    # Set before the checks, as the client API does: a refusal is audited against the store and its
    # project too (that project's operators see who tried; the caller does not learn it exists).
    request[AUDIT_KEYSTORE] = ks
    if not op.sees(ks.project_id):
        raise KeyStoreNotFound(f"no key store with id {ks.id}")
    if change:
        op.require("admin", project_id=ks.project_id)
    return op, ks


async def key_for(request: web.Request, *, change: bool = False,
                  with_versions: bool = False) -> tuple[Operator, KeyStore, Key]:
    op = await operator(request)
    rt = runtime(request)
    key = await rt.keys.key(request.match_info["key_id"], with_versions=with_versions)
    request[AUDIT_KEY] = key                  # before the checks: see keystore_for
    ks = await rt.keys.keystore(key.keystore_id)
    request[AUDIT_KEYSTORE] = ks
    if not op.sees(ks.project_id):
        raise InvalidKeyId("no key with that id")
    if change:
        op.require("admin", project_id=ks.project_id)
    return op, ks, key


async def name_in_audit(request: web.Request, *, keystore_id: int | None = None, key_id: str | None = None,
                        project_id: int | None = None) -> None:
    """Name a key, store or project in the request's audit record when the handler did not look them up
    through `key_for`/`keystore_for` (cached lookups; one that fails names nothing)."""
    rt = runtime(request)
    if project_id is not None:
        request[AUDIT_PROJECT] = project_id
    try:
        if key_id is not None:
            request[AUDIT_KEY] = await rt.keys.key(key_id)
            keystore_id = request[AUDIT_KEY].keystore_id
        if keystore_id is not None:
            request[AUDIT_KEYSTORE] = await rt.keys.keystore(int(keystore_id))
    except SKMError:
        pass               # gone (deleted by this very request): what was found is still named
