"""Client API: the key-change event stream (SSE) that sidecars follow.

Only for callers presenting a client certificate (the TLS layer has already
checked it chains to this server's CA; one must be presented). Events are those
of the appkey's project's key stores; an event says what changed (kind, key
store, key id, version), never a value. `hello` opens the stream, a comment
line every 15 s keeps it (and the caller's read timeout) alive, and `reset`
means the subscriber fell behind and must drop everything it cached.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from server.api.client.context import PREFIX, client_context
from server.api.routing import RouteTable
from server.errors import CertificateAuthFailure
from server.runtime import runtime

routes = RouteTable(PREFIX)
# What a client may hear: changes to keys, to a store's access rules or settings, and `reset`. Anything
# else on the bus (approval_requested: the management plane's business) stays off client streams.
CLIENT_EVENTS = frozenset({"secret_updated", "key_rotated", "key_created", "key_scheduled_deletion",
                           "key_deletion_cancelled", "key_deleted", "auth_changed", "keystore_updated", "reset"})
HEARTBEAT_SECONDS = 15.0
TICK_SECONDS = 0.25          # how often a stream looks whether the server is shutting down


def _server_closing(request: web.Request) -> bool:
    """True once the server is stopping: end the stream so shutdown does not wait on it.

    aiohttp marks the connection force-close at shutdown and offers no public
    signal a handler can await (on_shutdown is frozen before routes run)."""
    return bool(getattr(request.protocol, "_force_close", False))


@routes.route("GET", "/events", summary="Key-change events of the project's key stores (text/event-stream, "
              "sidecars only: requires a client certificate)", raw=True, tags=("client-events",),
              media_type="text/event-stream", response_schema={"type": "string"})
async def events(request: web.Request, _body) -> web.StreamResponse:
    ctx = await client_context(request)
    if not ctx.sent_certificate:
        raise CertificateAuthFailure("the event stream is for sidecars: connect with a host certificate "
                                     "issued by this server's CA")
    rt = runtime(request)
    heartbeat = float(rt.extra.get("sse_heartbeat", HEARTBEAT_SECONDS))
    stores = {s.id for s in await rt.keys.keystores(ctx.project.id)}
    queue = rt.events.subscribe()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        await resp.write(b": skm key-change events\n\nevent: hello\ndata: {}\n\n")
        idle = 0.0
        while not _server_closing(request):
            try:
                ev = await asyncio.wait_for(queue.get(), TICK_SECONDS)
            except asyncio.TimeoutError:
                idle += TICK_SECONDS
                if idle >= heartbeat:
                    idle = 0.0
                    await resp.write(b": ping\n\n")
                continue
            if ev.kind not in CLIENT_EVENTS:
                continue
            if ev.kind != "reset" and ev.keystore_id not in stores:
                # A store created after we subscribed belongs to the project too.
                stores = {s.id for s in await rt.keys.keystores(ctx.project.id)}
                if ev.keystore_id not in stores:
                    continue
            await resp.write(f"event: {ev.kind}\ndata: {ev.to_json()}\n\n".encode())
    except ConnectionResetError:
        pass                              # the sidecar went away
    finally:
        rt.events.unsubscribe(queue)
    return resp
