"""Route tables that register aiohttp routes and generate the OpenAPI document
from the same declarations, so the two cannot drift apart.

A handler is `async def h(request, body) -> dict | BaseModel | None`; `body` is
the validated request model (or None). The wrapper parses JSON, enforces the
content type, validates, and renders the success envelope; errors are raised
and rendered by the error middleware.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from server.api.envelope import ok_response
from server.api.timeouts import BODY_TIMEOUT
from server.errors import (InvalidJSON, InvalidRequest, PayloadTooLarge, RequestTimeout,
                           UnsupportedMediaType)
from server.runtime import KEY, request_value, runtime
from server.audit.middleware import BODY_MODEL

Handler = Callable[[web.Request, Any], Awaitable[Any]]


def ok(body: Any, status: int = 200) -> web.Response:
    if isinstance(body, BaseModel):
        body = body.model_dump(by_alias=True)
    return ok_response(body, status)


LOC_PART_MAX = 40      # a client's (unknown) field name is echoed this far, printable characters only


def _loc_part(x: Any) -> str:
    text = "".join(ch for ch in str(x) if ch.isprintable())
    return text if len(text) <= LOC_PART_MAX else text[:LOC_PART_MAX] + "..."


def describe_validation_error(e: ValidationError) -> str:
    """Field and problem only: pydantic's `input` may hold a secret, so it is never echoed."""
    parts = []
    for err in e.errors(include_url=False, include_input=False, include_context=False)[:5]:
        loc = ".".join(_loc_part(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


async def read_model(request: web.Request, model: type[BaseModel], *, optional: bool = False) -> BaseModel | None:
    if optional and not request.can_read_body:
        return model() if _all_optional(model) else None
    # The exact common value skips aiohttp's media-type parser; anything else is parsed as before.
    if request.headers.get("Content-Type") != "application/json" and request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    raw = await read_body(request)
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(describe_validation_error(e)) from None


def parse_json(raw: bytes | str) -> Any:
    """A request body as JSON: not JSON is `Invalid JSON`, nesting deeper than the parser goes
    (json.loads recurses per level: 100,000 `[` end in RecursionError) is `Invalid Request`;
    neither is a 500 with a traceback. No request model nests more than a few levels."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJSON("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("the request body nests too deeply; no request has more than a few levels") from None


async def read_body(request: web.Request) -> bytes:
    """The body, refused at once when its declared length is over the limit, and read within a deadline."""
    limit = request.client_max_size
    length = request.content_length
    if limit and length is not None and length > limit:
        raise PayloadTooLarge(f"the request body is larger than this server accepts ({limit} bytes)")
    try:
        rt = runtime(request)
    except KeyError:
        rt = None
    seconds = rt.config.body_timeout if rt is not None else BODY_TIMEOUT
    try:
        if request.content.is_eof():
            return await request.read()       # all of it is here already: no deadline to arm
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {seconds:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body is larger than this server accepts ({limit} bytes)") from None


def _all_optional(model: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in model.model_fields.values())


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    query: dict[str, dict] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    versions: tuple[str, ...] | None = None
    body_optional: bool = False
    raw: bool = False              # handler returns a web.Response itself
    status: int = 200
    media_type: str = "application/json"    # of the success response
    response_schema: dict | None = None     # success body schema when not from `response` (raw routes)
    enveloped: bool = True         # success body is {"header", "body"}; False: raw routes answering their own format
    public: bool = False           # management plane: no operator token needed (login)


class RouteTable:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.routes: list[Route] = []

    def route(self, method: str, path: str, *, summary: str, body: type[BaseModel] | None = None,
              response: type[BaseModel] | None = None, query: dict[str, dict] | None = None,
              tags: tuple[str, ...] = (), versions: tuple[str, ...] | None = None,
              body_optional: bool = False, raw: bool = False, status: int = 200,
              media_type: str = "application/json", response_schema: dict | None = None,
              enveloped: bool | None = None, public: bool = False):
        """`enveloped` defaults to True for JSON and False for any other media type."""
        if enveloped is None:
            enveloped = media_type == "application/json"
        if enveloped and media_type != "application/json":
            raise ValueError("an enveloped response is JSON")
        if not (raw or enveloped):
            raise ValueError("only a raw route answers without the envelope")

        def deco(fn: Handler) -> Handler:
            self.routes.append(Route(method, path, fn, summary, body=body, response=response, query=query or {},
                                     tags=tags, versions=versions, body_optional=body_optional, raw=raw,
                                     status=status, media_type=media_type, response_schema=response_schema,
                                     enveloped=enveloped, public=public))
            return fn
        return deco

    def extend(self, other: "RouteTable") -> None:
        self.routes.extend(other.routes)

    def register(self, app: web.Application) -> None:
        for r in self.routes:
            app.router.add_route(r.method, self.prefix + r.path, _wrap(r, self.prefix + r.path))

    def openapi(self, title: str, version: str, *, servers: list[dict] | None = None,
                security: dict | None = None) -> dict:
        paths: dict[str, dict] = {}
        schemas: dict[str, Any] = {}
        envelope_header = {
            "type": "object", "required": ["resultCode", "resultMessage", "isSuccessful"],
            "properties": {"resultCode": {"type": "integer"}, "resultMessage": {"type": "string"},
                           "isSuccessful": {"type": "boolean"}, "resultDetail": {"type": "string"}},
        }
        schemas["ResultHeader"] = envelope_header
        schemas["Error"] = {"type": "object", "required": ["header"],
                            "properties": {"header": {"$ref": "#/components/schemas/ResultHeader"},
                                           "body": {"type": "null"}}}
        for r in self.routes:
            path, params = _openapi_path(self.prefix + r.path, r.versions)
            op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__ + "_" + r.method.lower(),
                                  "tags": list(r.tags), "parameters": params}
            for name, schema in r.query.items():
                op["parameters"].append({"name": name, "in": "query", "required": False, "schema": schema})
            if r.body is not None:
                op["requestBody"] = {"required": not r.body_optional,
                                     "content": {"application/json": {"schema": _ref(r.body, schemas)}}}
            if r.response is not None:
                body_schema = _ref(r.response, schemas)
            else:
                body_schema = r.response_schema
            if r.enveloped:
                ok_schema: dict | None = {"type": "object", "required": ["header", "body"],
                                          "properties": {"header": {"$ref": "#/components/schemas/ResultHeader"},
                                                         "body": body_schema or {}}}
            else:
                ok_schema = body_schema
            ok_media = {"schema": ok_schema} if ok_schema is not None else {}
            op["responses"] = {
                str(r.status): {"description": "success", "content": {r.media_type: ok_media}},
                "4XX": {"description": "error envelope",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            }
            if security:
                op["security"] = [{name: []} for name in security]
            paths.setdefault(path, {})[r.method.lower()] = op
        # pydantic's schemas are JSON Schema 2020-12, which is OpenAPI 3.1's dialect.
        doc: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": title, "version": version},
                               "paths": paths, "components": {"schemas": schemas}}
        if servers:
            doc["servers"] = servers
        if security:
            doc["components"]["securitySchemes"] = security
        return doc


def _ref(model: type[BaseModel], schemas: dict) -> dict:
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas[name] = sub
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def path_params(path: str) -> tuple[str, list[tuple[str, str | None]]]:
    """OpenAPI form of an aiohttp path and its (name, regex) parameters; regexes may nest braces."""
    out, params, i = [], [], 0
    while i < len(path):
        if path[i] != "{":
            out.append(path[i])
            i += 1
            continue
        depth, j = 1, i + 1
        while depth:
            depth += {"{": 1, "}": -1}.get(path[j], 0)
            j += 1
        inner = path[i + 1:j - 1]
        name, _, pattern = inner.partition(":")
        params.append((name, pattern or None))
        out.append("{" + name + "}")
        i = j
    return "".join(out), params


def _openapi_path(path: str, versions: tuple[str, ...] | None) -> tuple[str, list[dict]]:
    clean, found = path_params(path)
    params = []
    for name, pattern in found:
        schema: dict[str, Any] = {"type": "string"}
        if name == "version":
            schema = {"type": "string", "enum": list(versions or ("v1.0", "v1.1", "v1.2", "v1.3"))}
        elif pattern:
            schema["pattern"] = "^(" + pattern + ")$"
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return clean, params


MGMT_PREFIX = "/api/v1"


def _wrap(r: Route, full_path: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    full_path = r.path if full_path is None else full_path
    # Management plane: authenticate before reading a body, so an anonymous caller cannot make the
    # server buffer and parse one (the handler's own admin()/operator() check still decides the role).
    auth_first = r.body is not None and not r.public and (
        full_path == MGMT_PREFIX or full_path.startswith(MGMT_PREFIX + "/"))

    async def handler(request: web.Request) -> web.StreamResponse:
        # A request refused here or in read_body leaves its body unread; the audit middleware
        # records it without reading it (server/audit.py).
        if r.versions is not None and request.match_info.get("version") not in r.versions:
            from server.errors import URLNotFound
            raise URLNotFound(f"this endpoint exists in API {', '.join(r.versions)} only")
        if auth_first:
            from server.api.mgmt.auth import operator
            await operator(request)
        if r.body is not None:
            request[BODY_MODEL] = r.body       # the audit leaves the fields it marks sensitive out of the body HMAC
        body = await read_model(request, r.body, optional=r.body_optional) if r.body is not None else None
        result = await r.handler(request, body)
        used = request_value(request, KEY)
        if used is not None:
            runtime(request).keys.touch(used)   # only successful uses count as access
        if r.raw:
            return result
        return ok(result, r.status)
    handler.__name__ = r.handler.__name__
    return handler
