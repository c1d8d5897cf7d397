"""Where clients reach the data plane (the client API), as the management API names it.

`public_url` when the server was told how clients reach it (a proxy or load balancer in front);
otherwise the data listener itself: its configured host when it binds one address, or the host the
operator reached this management listener by when it binds every address (0.0.0.0, ::), and the
port it actually listens on. That is the URL `skm demo` prints.
"""
from __future__ import annotations

from aiohttp import web

from server.runtime import runtime

_ANY_HOST = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def data_plane_base(request: web.Request) -> str:
    """`https://host:port` of the data plane (no trailing slash)."""
    rt = runtime(request)
    public = (rt.config.public_url or "").rstrip("/")
    if public:
        return public
    host = rt.config.data.host.strip()
    if host in _ANY_HOST:
        host = request.url.host or "localhost"
    host = host.strip("[]")
    if ":" in host:
        host = f"[{host}]"          # IPv6 literal
    port = rt.extra.get("data_port") or rt.config.data.port
    return f"https://{host}:{port}"


def data_plane_url(request: web.Request, appkey: str) -> str:
    """The client-API base of one project (every client-API path starts with it)."""
    return f"{data_plane_base(request)}/keymanager/v1.0/appkey/{appkey}"
