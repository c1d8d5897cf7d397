"""Client API management and inventory (NHN §4.5, §4.6, §4.8, §4.9).

Key create/delete and auth-data writes are v1.2+ (caller credentials
required); the read-only inventory is v1.0+. Writes go through the ChangeGate,
so an approval store turns them into change requests.

Who may administer a store over the client API: the caller credential (an admin's
user access key or bearer token) says who acts, AND the request must pass the
store's own client checks (IPv4 / MAC / certificate), exactly as a key use does.
NHN's document is silent on whether its management APIs apply those checks
(nhn-skm-api.md §3.2, "[UNKNOWN]"); a leaked access key alone must not rewrite a
store's access rules from anywhere, so here they do (defence in depth). A store's
first entries are therefore registered on the management plane (`skm auth ...`,
the console), which the client checks do not gate.

The inventory needs the store's checks too, unless `[compat] inventory_appkey_only`
(context.authorize_inventory).
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import Field

from server.api.client import models as m
from server.api.client.context import (PREFIX, authorize_inventory, authorize_keystore, client_context,
                                       inventory_appkey_only, passes_keystore)
from server.api.client.crypto_routes import V12
from server.api.routing import RouteTable
from server.api.params import int_param
from server.errors import InvalidRequest
from server.keys.model import KeyType
from server.runtime import runtime
from server.text import SafeText

routes = RouteTable(PREFIX)


async def _ks_by_name(request: web.Request, name: str):
    """The store a write names, once the request passes its client checks (see the module docstring)."""
    ctx = await client_context(request)
    ks = await runtime(request).keys.keystore_by_name(ctx.project.id, name)
    await authorize_keystore(request, ctx, ks)
    return ctx, ks


async def _create(request: web.Request, body, key_type: KeyType, **extra) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    key = await runtime(request).changes.submit(ctx, ks, "key.create", {
        "keystore_id": ks.id, "key_type": key_type.value, "name": body.name,
        "description": body.description, **extra})
    return {"keyId": key.id, "keyStatus": key.status.value}


@routes.route("POST", "/keys/secrets/create", summary="Create a SECRET", body=m.SecretCreateIn,
              response=m.KeyCreateOut, versions=V12, tags=("client-manage",))
async def create_secret(request: web.Request, body: m.SecretCreateIn) -> dict:
    return await _create(request, body, KeyType.SECRET, secret_value=body.secretValue)


@routes.route("POST", "/keys/symmetric-keys/create", summary="Create a symmetric key", body=m.CryptoKeyCreateIn,
              response=m.KeyCreateOut, versions=V12, tags=("client-manage",))
async def create_symmetric(request: web.Request, body: m.CryptoKeyCreateIn) -> dict:
    return await _create(request, body, KeyType.SYMMETRIC_KEY, auto_rotation_days=body.autoRotationPeriod)


@routes.route("POST", "/keys/asymmetric-keys/create", summary="Create an asymmetric key (RSA-2048)",
              body=m.CryptoKeyCreateIn, response=m.KeyCreateOut, versions=V12, tags=("client-manage",))
async def create_asymmetric(request: web.Request, body: m.CryptoKeyCreateIn) -> dict:
    return await _create(request, body, KeyType.ASYMMETRIC_KEY, auto_rotation_days=body.autoRotationPeriod)


async def _key_in_project(request: web.Request):
    ctx = await client_context(request)
    rt = runtime(request)
    key = await rt.keys.key(request.match_info["keyid"], project_id=ctx.project.id)
    ks = await rt.keys.keystore(key.keystore_id)
    await authorize_keystore(request, ctx, ks)          # as for _ks_by_name
    return ctx, key, ks


@routes.route("PUT", "/keys/{keyid}/delete", summary="Schedule a key for deletion", response=m.KeyDeleteOut,
              versions=V12, tags=("client-manage",))
async def schedule_key_deletion(request: web.Request, _body) -> dict:
    ctx, key, ks = await _key_in_project(request)
    key = await runtime(request).changes.submit_key_op(ctx, ks, "key.schedule_deletion", key)
    from server.timeutil import to_api
    return {"keyId": key.id, "deletionDateTime": to_api(key.deletion_at)}


@routes.route("DELETE", "/keys/{keyid}", summary="Delete a key scheduled for deletion now", response=m.KeyDeleteOut,
              versions=V12, tags=("client-manage",))
async def delete_key(request: web.Request, _body) -> dict:
    ctx, key, ks = await _key_in_project(request)
    when = await runtime(request).changes.submit_key_op(ctx, ks, "key.delete", key)
    return {"keyId": key.id, "deletionDateTime": when}


# ---------------------------------------------------------------- auth data
class AuthAddIn(m._In):
    keyStoreName: str = Field(min_length=1, max_length=100)
    value: str = Field(min_length=1, max_length=64)
    description: SafeText = Field(default="", max_length=1000)


class AuthRefIn(m._In):
    keyStoreName: str = Field(min_length=1, max_length=100)
    value: str = Field(min_length=1, max_length=64)


class AuthOut(m.BaseModel):
    value: str
    description: Optional[str] = None
    deletionDateTime: Optional[str] = None


def _auth_kind(request: web.Request) -> str:
    return request.match_info["kind"]


@routes.route("POST", "/auths/{kind:ipv4s|macs}", summary="Register an IPv4/CIDR or MAC for a key store",
              body=AuthAddIn, response=AuthOut, versions=V12, tags=("client-manage",))
async def add_auth(request: web.Request, body: AuthAddIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    row = await runtime(request).changes.submit(ctx, ks, "auth.add", {
        "keystore_id": ks.id, "kind": _auth_kind(request), "value": body.value, "description": body.description})
    return {"value": row["value"], "description": row["description"]}


@routes.route("PUT", "/auths/{kind:ipv4s|macs}/delete", summary="Schedule an IPv4/MAC entry for deletion",
              body=AuthRefIn, response=AuthOut, versions=V12, tags=("client-manage",))
async def schedule_auth_deletion(request: web.Request, body: AuthRefIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    return await runtime(request).changes.submit(ctx, ks, "auth.schedule_deletion", {
        "keystore_id": ks.id, "kind": _auth_kind(request), "value": body.value})


@routes.route("POST", "/auths/{kind:ipv4s|macs}/delete", summary="Delete a scheduled IPv4/MAC entry now",
              body=AuthRefIn, response=AuthOut, versions=V12, tags=("client-manage",))
async def delete_auth(request: web.Request, body: AuthRefIn) -> dict:
    ctx, ks = await _ks_by_name(request, body.keyStoreName)
    return await runtime(request).changes.submit(ctx, ks, "auth.delete", {
        "keystore_id": ks.id, "kind": _auth_kind(request), "value": body.value})


# ---------------------------------------------------------------- inventory
def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


async def _keystore_param(request: web.Request):
    ctx = await client_context(request)
    raw = request.match_info["keystoreid"]
    ks = await runtime(request).keys.keystore(int(raw), project_id=ctx.project.id)
    await authorize_inventory(request, ctx, ks)
    return ks


@routes.route("GET", "/keystores", summary="List key stores", query={"detail": {"type": "boolean"}},
              tags=("client-inventory",))
async def list_keystores(request: web.Request, _body) -> dict:
    ctx = await client_context(request)
    stores = await runtime(request).keys.keystores(ctx.project.id)
    if not inventory_appkey_only(request):
        # Only the stores whose checks this caller passes; the others are not its business.
        stores = [s for s in stores if await passes_keystore(request, ctx, s)]
    if _flag(request, "detail"):
        return {"keyStoreList": [s.to_api() for s in stores]}
    return {"keyStoreIdList": [s.id for s in stores]}


@routes.route("GET", r"/keystores/{keystoreid:\d{1,12}}", summary="One key store", tags=("client-inventory",))
async def get_keystore(request: web.Request, _body) -> dict:
    return (await _keystore_param(request)).to_api()


@routes.route("GET", r"/keystores/{keystoreid:\d{1,12}}/keys", summary="List a key store's keys",
              query={"detail": {"type": "boolean"}, "type": {"type": "string"}, "name": {"type": "string"},
                     "status": {"type": "string"}, "pageNumber": {"type": "integer"}, "pageSize": {"type": "integer"}},
              tags=("client-inventory",))
async def list_keys(request: web.Request, _body) -> dict:
    ks = await _keystore_param(request)
    rt = runtime(request)
    if not _flag(request, "detail"):
        return {"keyIdList": await rt.keys.key_ids(ks.id)}
    q = request.query
    name = q.get("name")
    if name is not None and len(name) > 100:
        raise InvalidRequest("name must be at most 100 characters")
    status = q.get("status")
    if status not in (None, "active", "inactive"):
        raise InvalidRequest("status must be active or inactive")
    keys = await rt.keys.keys(ks.id, key_type=q.get("type"), name=name, status=status,
                              page=int_param(request.query, "pageNumber", 1, 1, 10**6),
                              page_size=int_param(request.query, "pageSize", 10, 10, 100))
    return {"keyList": [k.to_api() for k in keys]}


@routes.route("GET", r"/keystores/{keystoreid:\d{1,12}}/keys/{keyid}", summary="One key's metadata",
              tags=("client-inventory",))
async def get_key(request: web.Request, _body) -> dict:
    ks = await _keystore_param(request)
    key = await runtime(request).keys.key(request.match_info["keyid"])
    if key.keystore_id != ks.id:
        from server.errors import InvalidKeyId
        raise InvalidKeyId("no key with that id in this key store")
    return key.to_api()


_LIST_NAMES = {"ips": ("ipv4s", "ipv4List"), "macs": ("macs", "macList")}


@routes.route("GET", r"/keystores/{keystoreid:\d{1,12}}/{kind:ips|macs}", summary="A key store's IPv4 or MAC entries",
              query={"value": {"type": "string"}}, tags=("client-inventory",))
async def list_auth(request: web.Request, _body) -> dict:
    ks = await _keystore_param(request)
    kind, field = _LIST_NAMES[request.match_info["kind"]]
    value = request.query.get("value")
    rows = await runtime(request).authdata.list(ks, kind, value)
    if value is None:
        return {field: [r["value"] for r in rows]}
    return {field: rows}
