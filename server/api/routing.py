"""Route tables that register aiohttp routes and generate the OpenAPI document
from the same declarations, so the two cannot drift apart.

A handler is `async def h(request, body) -> dict | BaseModel | None`; `body` is
the validated request model (or None). The wrapper parses JSON, enforces the
content type, validates, and renders the success envelope; errors are raised
and rendered by the error middleware.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError

from server.errors import InvalidJSON, InvalidRequest, UnsupportedMediaType
from server.runtime import KEY, runtime

Handler = Callable[[web.Request, Any], Awaitable[Any]]

SUCCESS_HEADER = {"resultCode": 0, "resultMessage": "success", "isSuccessful": True}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def ok(body: Any, status: int = 200) -> web.Response:
    if isinstance(body, BaseModel):
        body = body.model_dump(by_alias=True)
    return web.Response(text=_dumps({"header": SUCCESS_HEADER, "body": body}), status=status,
                        content_type="application/json")


def describe_validation_error(e: ValidationError) -> str:
    """Field and problem only: pydantic's `input` may hold a secret, so it is never echoed."""
    parts = []
    for err in e.errors(include_url=False, include_input=False, include_context=False)[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


async def read_model(request: web.Request, model: type[BaseModel], *, optional: bool = False) -> BaseModel | None:
    if optional and not request.can_read_body:
        return model() if _all_optional(model) else None
    ctype = request.content_type
    if ctype != "application/json":
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJSON("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(describe_validation_error(e)) from None


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


class RouteTable:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.routes: list[Route] = []

    def route(self, method: str, path: str, *, summary: str, body: type[BaseModel] | None = None,
              response: type[BaseModel] | None = None, query: dict[str, dict] | None = None,
              tags: tuple[str, ...] = (), versions: tuple[str, ...] | None = None,
              body_optional: bool = False, raw: bool = False, status: int = 200):
        def deco(fn: Handler) -> Handler:
            self.routes.append(Route(method, path, fn, summary, body, response, query or {}, tags, versions,
                                     body_optional, raw, status))
            return fn
        return deco

    def extend(self, other: "RouteTable") -> None:
        self.routes.extend(other.routes)

    def register(self, app: web.Application) -> None:
        for r in self.routes:
            app.router.add_route(r.method, self.prefix + r.path, _wrap(r))

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
            body_schema = _ref(r.response, schemas) if r.response else {}
            ok_schema = {"type": "object", "required": ["header", "body"],
                         "properties": {"header": {"$ref": "#/components/schemas/ResultHeader"},
                                        "body": body_schema}}
            op["responses"] = {
                str(r.status): {"description": "success",
                                "content": {"application/json": {"schema": ok_schema}}},
                "4XX": {"description": "error envelope",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            }
            if security:
                op["security"] = [{name: []} for name in security]
            paths.setdefault(path, {})[r.method.lower()] = op
        doc: dict[str, Any] = {"openapi": "3.0.3", "info": {"title": title, "version": version},
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


def _wrap(r: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if r.versions is not None and request.match_info.get("version") not in r.versions:
            from server.errors import URLNotFound
            raise URLNotFound(f"this endpoint exists in API {', '.join(r.versions)} only")
        body = await read_model(request, r.body, optional=r.body_optional) if r.body is not None else None
        result = await r.handler(request, body)
        used = request.get(KEY)
        if used is not None:
            runtime(request).keys.touch(used)   # only successful uses count as access
        if r.raw:
            return result
        return ok(result, r.status)
    handler.__name__ = r.handler.__name__
    return handler
