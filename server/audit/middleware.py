"""The per-request audit record, on both listeners.

The body HMAC covers a body the request's handler read; the middleware itself never reads from the
connection. A request refused before its body was read (no operator token, too large, too slow, an
unknown API version) is recorded with `bodyHmac: "not read"`: waiting for that body here would let a
client that declared 10 GiB and sent 1 KiB hold the request (and its audit record) open.

Fields that carry passwords are left out of the body HMAC (an HMAC of a low-entropy secret under a
key the server holds is a password hash an insider could test guesses against): those a request
model marks `sensitive`, and any field named like a password.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from server import logs
from server.access.tls import peer_identity
from server.audit.actions import is_console_view, lookup
from server.errors import ApprovalRequired, SKMError, Unavailable
from server.runtime import CLIENT_CTX, ERROR, KEY, OPERATOR, _request_key, request_value, runtime

log = logs.get("skm.audit")

AUDIT_ACTION = _request_key("skm_audit_action")   # a handler may name what it did, e.g. "key.reveal"
AUDIT_DETAIL = _request_key("skm_audit_detail")   # extra identifiers (never values) for the record
BODY_MODEL = _request_key("skm_body_model")       # the request model the route validated its body with
# The key and key store a management request acted on, as its handler looked them up (server/api/mgmt/auth.py).
# Not `KEY`: that one also counts the request as a use of the key (last access, usage), which an operator's
# management call is not.
AUDIT_KEY = _request_key("skm_audit_key")
AUDIT_KEYSTORE = _request_key("skm_audit_keystore")
AUDIT_PROJECT = _request_key("skm_audit_project")   # a record's project when no key or store names it
SKIP_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
SKIP_PREFIXES = ("/console/static/",)             # the console's CSS/JS: no decision to record
# Requests whose whole body is a password: no body HMAC at all.
NO_BODY_HMAC = frozenset({("POST", "/api/v1/login"), ("POST", "/console/login")})
BODY_NOT_READ = "not read"      # bodyHmac of a body nobody read (the request was refused before that)


@functools.lru_cache(maxsize=512)
def sensitive_fields(model: Any) -> frozenset[str]:
    """Field names (and aliases) a pydantic model marks `json_schema_extra={"sensitive": True}`.

    Memoised per model class (a route's model never changes; every audited body asks)."""
    out: set[str] = set()
    for name, f in getattr(model, "model_fields", {}).items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("sensitive"):
            out.add(name)
            if f.alias:
                out.add(f.alias)
    return frozenset(out)


def _password_like(name: str) -> bool:
    n = name.lower()
    return "password" in n or n in ("passwd", "pass", "pin")


def strip_sensitive(body: bytes, content_type: str, marked: frozenset[str]) -> tuple[bytes, list[str]]:
    """The body without its sensitive fields (JSON objects and forms), and the names left out."""
    try:
        if content_type == "application/x-www-form-urlencoded":
            pairs = parse_qsl(body.decode(), keep_blank_values=True)
            drop = sorted({k for k, _ in pairs if k in marked or _password_like(k)})
            if not drop:
                return body, []
            return urlencode([(k, v) for k, v in pairs if k not in drop]).encode(), drop
        if content_type == "application/json":
            if _no_sensitive_key(body, marked):
                return body, []
            data = json.loads(body)
            if not isinstance(data, dict):
                return body, []
            drop = sorted(k for k in data if k in marked or _password_like(k))
            if not drop:
                return body, []
            kept = {k: v for k, v in data.items() if k not in drop}
            return json.dumps(kept, separators=(",", ":"), sort_keys=True).encode(), drop
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    return body, []


def _no_sensitive_key(body: bytes, marked: frozenset[str]) -> bool:
    """True when no key of this JSON body can be sensitive, decided without parsing it (the common case).

    In UTF-8 (json.loads also takes UTF-16/32, whose ASCII letters come with NUL bytes) and without
    a backslash every key appears in the bytes as written; a password-like key holds "pass" or "pin"
    (in ASCII letters), and a marked field its own name. A body that might hold one is parsed."""
    if b"\\" in body or b"\0" in body:
        return False
    low = body.lower()
    return b"pass" not in low and b"pin" not in low and not any(m.encode() in body for m in marked)


def middleware(audit, plane: str):
    @web.middleware
    async def audit_mw(request: web.Request, handler):
        if not audit.settings.enabled or _skipped(request.method, request.path):
            return await handler(request)
        der = _peer_der(request)          # the transport is gone once the peer leaves
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await _record_quietly(audit, request, plane, der, 500)
            raise
        try:
            await audit.append(await describe(audit, request, plane, der, resp.status, resp))
        except Exception as e:
            _log_write_failure(e, plane, request)
            if audit.settings.fail_closed and not resp.prepared:
                from server.api.envelope import error_response
                return error_response(Unavailable("the audit log cannot be written, so the request is "
                                                  "refused (audit is fail-closed)"))
        return resp
    return audit_mw


async def _record_quietly(audit, request: web.Request, plane: str, der: bytes | None, status: int) -> None:
    try:
        await audit.append(await describe(audit, request, plane, der, status))
    except Exception as e:
        _log_write_failure(e, plane, request)


async def _names(rt, rec: dict, detail: dict, key, ks=None) -> None:
    """Key and store names beside their ids, and the record's project (from cached metadata).

    `ks` is the store the handler already looked up: no second lookup, and its name and project
    survive the request that deleted it."""
    if key is not None:
        detail["keyName"] = key.name
    if detail.get("keyName") is None:
        detail.pop("keyName", None)
    ks_id = rec.get("keystore_id")
    if ks_id is None or rt.keys is None:
        return
    if ks is None or ks.id != ks_id:
        try:
            ks = await rt.keys.keystore(int(ks_id))
        except (SKMError, ValueError):
            return
    detail["keyStoreName"] = ks.name
    if rec.get("project_id") is None:
        rec["project_id"] = ks.project_id


def _created(resp) -> dict:
    """What a create answered with (its new key's or store's id), from the response body."""
    body = getattr(resp, "body", None)
    if not isinstance(body, (bytes, bytearray)) or len(body) > 65536:
        return {}
    try:
        out = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    inner = out.get("body") if isinstance(out, dict) else None
    return inner if isinstance(inner, dict) else {}


async def describe(audit, request: web.Request, plane: str, der: bytes | None, status: int,
                   resp: web.StreamResponse | None = None) -> dict:
    err: SKMError | None = request_value(request, ERROR)
    resource = request.match_info.route.resource if request.match_info.route is not None else None
    route = resource.canonical if resource is not None else None
    detail: dict[str, Any] = dict(request_value(request, AUDIT_DETAIL) or {})
    rid = request.headers.get("X-Request-Id")
    if rid and len(rid) <= 64:
        detail["requestId"] = rid
    if request.body_exists and (request.method, request.path.rstrip("/")) not in NO_BODY_HMAC:
        body = await _body_read_by_handler(request)
        if body is None:
            detail["bodyHmac"] = BODY_NOT_READ
        elif body:
            marked = sensitive_fields(request_value(request, BODY_MODEL))
            body, dropped = strip_sensitive(body, request.content_type, marked)
            if dropped:
                detail["bodyOmitted"] = dropped
            mac = await audit.hmac(body)
            detail["bodyHmac"] = mac if mac is not None else "unavailable (sealed)"
    rec: dict[str, Any] = {"plane": plane, "method": request.method, "route": route, "status": status,
                           "ip": request.remote or None}
    ctx = request_value(request, CLIENT_CTX)
    op = request_value(request, OPERATOR)
    rt = runtime(request)
    if ctx is not None:
        rec["project_id"] = ctx.project.id
    if op is not None:
        rec.update(actor=op.name, actor_kind="operator")
        cred = getattr(op, "credential", None) or (f"token:{op.token_id}" if op.token_id else None)
        if cred:
            detail["credential"] = cred
        if ctx is not None:
            rec.update(ip=ctx.peer_ip or None, fingerprint=ctx.fingerprint,
                       mac=(ctx.mac_header or None) and ctx.mac_header[:64])
    elif ctx is not None:
        rec.update(actor=ctx.caller, actor_kind="client", ip=ctx.peer_ip or None, fingerprint=ctx.fingerprint,
                   mac=(ctx.mac_header or None) and ctx.mac_header[:64])
    else:
        rec.update(actor="anonymous", actor_kind="anonymous",
                   fingerprint=_fingerprint(request, der))
        if rt.access is not None:
            rec["ip"] = rt.access.client_ip(request) or None
        if plane == "data":
            m = request.headers.get("X-TOAST-CLIENT-MAC-ADDR")
            rec["mac"] = m[:64] if m else None
    key = request_value(request, KEY) or request_value(request, AUDIT_KEY)
    store = request_value(request, AUDIT_KEYSTORE)
    key_id = key.id if key is not None else (request.match_info.get("key_id") or request.match_info.get("keyid"))
    rec["key_id"] = key_id[:64] if key_id else None
    ks = request.match_info.get("keystore_id") or request.match_info.get("keystoreid")
    if key is not None:
        rec["keystore_id"] = key.keystore_id
    elif store is not None:
        rec["keystore_id"] = store.id
    else:
        rec["keystore_id"] = int(ks) if ks and (ks.isascii() and ks.isdigit()) else None
    named = request_value(request, AUDIT_ACTION)
    act = lookup(request.method, route, request.match_info)
    if act is not None and act.name in ("key.create", "keystore.create") and status < 300 and resp is not None:
        made = _created(resp)
        kid, ksid = made.get("keyId"), made.get("keyStoreId")
        if isinstance(kid, str) and rec["key_id"] is None:
            rec["key_id"] = kid[:64]
            detail.setdefault("keyName", made.get("name") if isinstance(made.get("name"), str) else None)
        if isinstance(ksid, int) and rec["keystore_id"] is None:
            rec["keystore_id"] = ksid
    await _names(rt, rec, detail, key, store)
    if rec.get("project_id") is None:
        rec["project_id"] = request_value(request, AUDIT_PROJECT)
    if named:
        rec["action"] = named
        rec["change"] = act.change if act is not None else None
    elif act is not None:
        rec["action"], rec["change"] = act.name, act.change
    else:
        rec["action"], rec["change"] = f"{request.method} {route}", request.method not in ("GET", "HEAD")
    if isinstance(err, ApprovalRequired):
        rec["result"] = "approval_required"
        detail["changeRequestId"] = err.request_id
    elif status < 400:
        rec["result"] = "ok"
    else:
        rec["result"] = "denied" if status in (401, 403, 429) else ("error" if status >= 500 else "refused")
        if err is not None:
            rec["reason"] = err.message + (f": {err.detail}" if err.detail else "")
        else:
            rec["reason"] = f"HTTP {status}"
    if rec["result"] != "ok" and rec["change"]:
        rec["change"] = False          # nothing changed (a change request is its own record when applied)
    rec["detail"] = detail
    return rec


async def _body_read_by_handler(request: web.Request) -> bytes | None:
    """The body the handler read, or None when it was not read to its end.

    `at_eof()` (all of the body received and consumed) says the handler read it; aiohttp keeps
    what `read()`/`json()`/`post()` read, so `read()` returns it without touching the connection."""
    if not request.content.at_eof():
        return None
    try:
        return await request.read()
    except Exception:      # nothing to fingerprint
        return None


def _log_write_failure(e: Exception, plane: str, request: web.Request) -> None:
    if isinstance(e, SKMError):
        # Expected (e.g. the database is unreachable): the reason, no stack trace.
        log.warning("audit_write_failed", plane=plane, path=request.rel_url.path, result=e.message,
                    error_type=type(e).__name__)
    else:
        log.exception("audit_write_failed", plane=plane, path=request.rel_url.path)


def _skipped(method: str, path: str) -> bool:
    return path in SKIP_PATHS or path.startswith(SKIP_PREFIXES) or is_console_view(method, path)


def _fingerprint(request: web.Request, der: bytes | None) -> str | None:
    if not der:
        return None
    memo = getattr(request.protocol, "peer_identity", None)
    return memo[1] if memo is not None and memo[0] is der else hashlib.sha256(der).hexdigest()


def _peer_der(request: web.Request) -> bytes | None:
    try:
        return peer_identity(request)[0]      # once per connection
    except ValueError:
        return None
