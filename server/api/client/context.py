"""The client-API request pipeline: who is calling, from where, with what.

Steps, in order: appkey -> caller credentials (by API version) -> the key's
key-store client checks (IPv4 / MAC / certificate, AND or OR). Each step is one
call here so access-control modules slot in without touching handlers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server.access.tls import peer_identity
from server.audit.middleware import AUDIT_KEYSTORE
from server.errors import InvalidAppkey, Sealed
from server.keys.model import Key, KeyStore, Project
from server.runtime import CLIENT_CTX, KEY, request_value, runtime
from server.text import storable

PREFIX = r"/keymanager/{version:v1\.[0-3]}/appkey/{appkey:[A-Za-z0-9_-]{1,64}}"
MAC_HEADER = "X-TOAST-CLIENT-MAC-ADDR"


@dataclass
class ClientContext:
    version: str
    project: Project
    peer_ip: str
    cert_der: bytes | None
    fingerprint: str | None
    mac_header: str | None
    caller: str = "appkey"          # audit identity: appkey, user access key id, token id
    operator: Any = None            # the Operator owning the v1.2/v1.3 credential (one identity per person)
    credential: str | None = None   # "accesskey:<id>" or "bearer:<id>"

    @property
    def sent_certificate(self) -> bool:
        return self.cert_der is not None


def peer_certificate(request: web.Request) -> bytes | None:
    return peer_identity(request)[0]


def peer_ip(request: web.Request) -> str:
    rt = runtime(request)
    if rt.access is not None:
        return rt.access.client_ip(request)
    return request.remote or ""


async def client_context(request: web.Request) -> ClientContext:
    ctx = request_value(request, CLIENT_CTX)
    if ctx is not None:
        return ctx
    rt = runtime(request)
    if rt.barrier.sealed:
        raise Sealed(rt.barrier.sealed_reason)
    appkey = request.match_info["appkey"]
    project = await rt.keys.project_by_appkey(appkey)
    if project is None:
        raise InvalidAppkey("no project has that appkey")
    der, fingerprint = peer_identity(request)
    ctx = ClientContext(
        version=request.match_info["version"], project=project, peer_ip=peer_ip(request),
        cert_der=der, fingerprint=fingerprint,
        mac_header=storable(request.headers.get(MAC_HEADER, "")) or None,   # echoed by /confirm
    )
    if rt.callers is not None:
        ctx.caller = await rt.callers.authenticate(request, ctx)
    elif ctx.version in ("v1.2", "v1.3"):
        from server.errors import Unauthenticated
        raise Unauthenticated("caller credentials are not configured on this server")   # fail closed
    request[CLIENT_CTX] = ctx
    return ctx


async def authorize_keystore(request: web.Request, ctx: ClientContext, ks: KeyStore) -> None:
    rt = runtime(request)
    if rt.access is None:
        from server.errors import Forbidden
        raise Forbidden("client access checks are not configured")   # fail closed
    await rt.access.authorize(request, ctx, ks)


async def passes_keystore(request: web.Request, ctx: ClientContext, ks: KeyStore) -> bool:
    rt = runtime(request)
    return rt.access is not None and await rt.access.passes(request, ctx, ks)


def inventory_appkey_only(request: web.Request) -> bool:
    """`[compat] inventory_appkey_only`: the v1.0 inventory answers anyone with the appkey, as NHN's does."""
    compat = getattr(runtime(request).config, "compat", None)
    return bool(getattr(compat, "inventory_appkey_only", False))


async def authorize_inventory(request: web.Request, ctx: ClientContext, ks: KeyStore) -> None:
    """The inventory of a store (its keys, IPs, MACs, certificate names) is for whoever passes the store's
    own checks; NHN hands it to any holder of the appkey, which `[compat] inventory_appkey_only` restores."""
    if not inventory_appkey_only(request):
        await authorize_keystore(request, ctx, ks)


async def key_for_use(request: web.Request, *, check_access: bool = True) -> tuple[ClientContext, Key]:
    """Resolve `{keyid}` in the caller's project and pass its key store's client checks."""
    rt = runtime(request)
    ctx = await client_context(request)
    key, ks = await rt.keys.key_in_project(request.match_info["keyid"], ctx.project.id)
    # Set before the checks: a denial is then counted and audited against its key and store (the
    # record names the store without looking it up again). The routing wrapper records an access
    # only once the request succeeds.
    request[KEY], request[AUDIT_KEYSTORE] = key, ks
    if check_access:
        await authorize_keystore(request, ctx, ks)
    return ctx, key
