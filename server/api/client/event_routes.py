"""Client API: the key-change event stream (SSE) that sidecars follow.

Who hears what: the caller must present a client certificate (the TLS layer has
already checked it chains to this server's CA) AND pass the client checks of at
least one key store of the appkey's project, exactly as a key use would; it hears
only the events of the stores it passes (plus `reset`). A certificate alone, one
deleted from its store or one of another project's store, opens nothing.

The checks are re-run while the stream is open: for a store whenever its access
rules or settings change (`auth_changed`, `keystore_updated`, `keystore_deleted`),
for every store on `reset` and at each heartbeat (a certificate that expired, a
neighbour-table MAC that moved). The event that took a store away is still sent
(the sidecar drops what it cached from it); once the caller passes no store the
stream ends, so a deleted certificate stops receiving at once.

An event says what changed (kind, key store, key id, version), never a value.
`hello` opens the stream, a comment line every 15 s keeps it (and the caller's
read timeout) alive, and `reset` means the subscriber fell behind and must drop
everything it cached.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from server import logs
from server.api.client.context import PREFIX, client_context, passes_keystore
from server.api.routing import RouteTable
from server.errors import CertificateAuthFailure, SKMError
from server.runtime import runtime

log = logs.get("skm.events")

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


RECHECK = frozenset({"auth_changed", "keystore_updated", "keystore_deleted"})


class _Admission:
    """The project's stores this stream's caller passes, kept current while the stream is open."""

    def __init__(self, request: web.Request, ctx) -> None:
        self.request, self.ctx = request, ctx
        self.rt = runtime(request)
        self.admitted: set[int] = set()
        self.refused: set[int] = set()          # known stores of the project the caller does not pass

    async def _passes(self, store_id: int) -> bool:
        try:
            ks = await self.rt.keys.keystore(store_id, project_id=self.ctx.project.id)
        except SKMError:                         # deleted, or another project's
            return False
        return await passes_keystore(self.request, self.ctx, ks)

    async def recheck(self, store_id: int) -> bool:
        """Re-run the store's checks; True when it was or is admitted (the event about it is this caller's)."""
        was = store_id in self.admitted
        self.admitted.discard(store_id)
        self.refused.discard(store_id)
        (self.admitted if await self._passes(store_id) else self.refused).add(store_id)
        return was or store_id in self.admitted

    async def recheck_all(self) -> None:
        stores = await self.rt.keys.keystores(self.ctx.project.id)
        self.admitted, self.refused = set(), set()
        for ks in stores:
            (self.admitted if await passes_keystore(self.request, self.ctx, ks) else self.refused).add(ks.id)

    async def hears(self, store_id: int) -> bool:
        if store_id in self.admitted:
            return True
        if store_id in self.refused:
            return False
        return await self.recheck(store_id)      # a store created after the stream opened


@routes.route("GET", "/events", summary="Key-change events of the key stores whose checks the caller passes "
              "(text/event-stream, sidecars only: requires a client certificate)", raw=True, tags=("client-events",),
              media_type="text/event-stream", response_schema={"type": "string"})
async def events(request: web.Request, _body) -> web.StreamResponse:
    ctx = await client_context(request)
    if not ctx.sent_certificate:
        raise CertificateAuthFailure("the event stream is for sidecars: connect with a host certificate "
                                     "issued by this server's CA")
    rt = runtime(request)
    heartbeat = float(rt.extra.get("sse_heartbeat", HEARTBEAT_SECONDS))
    queue = rt.events.subscribe()                # before the checks: nothing that changes them is missed
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    try:
        seen = _Admission(request, ctx)
        await seen.recheck_all()
        if not seen.admitted:
            raise CertificateAuthFailure("this connection passes the client checks of no key store of this "
                                         "project; register the host (IPv4, MAC or certificate) with a key store")
        await resp.prepare(request)
        await resp.write(b": skm key-change events\n\nevent: hello\ndata: {}\n\n")
        await _follow(request, resp, queue, seen, heartbeat)
    except ConnectionResetError:
        pass                              # the sidecar went away
    finally:
        rt.events.unsubscribe(queue)
    return resp


async def _follow(request: web.Request, resp: web.StreamResponse, queue: asyncio.Queue, seen: _Admission,
                  heartbeat: float) -> None:
    idle = 0.0
    while not _server_closing(request):
        try:
            ev = await asyncio.wait_for(queue.get(), TICK_SECONDS)
        except asyncio.TimeoutError:
            idle += TICK_SECONDS
            if idle >= heartbeat:
                idle = 0.0
                if not await _recheck(seen, None):
                    return
                await resp.write(b": ping\n\n")
            continue
        if ev.kind == "reset":
            await _recheck(seen, None)
            send = True                          # names no store; tells the sidecar to drop everything
        elif ev.kind in RECHECK:
            send = await _recheck(seen, ev.keystore_id)
        elif ev.kind in CLIENT_EVENTS:
            send = await _recheck(seen, ev.keystore_id, use=True)
        else:
            continue
        if send and ev.kind in CLIENT_EVENTS:
            await resp.write(f"event: {ev.kind}\ndata: {ev.to_json()}\n\n".encode())
        if not seen.admitted:
            return                               # no store admits this caller any more: end the stream


async def _recheck(seen: _Admission, store_id: int | None, *, use: bool = False) -> bool:
    """Run a check; one that cannot run (storage away) ends the stream: fail closed, the sidecar reconnects."""
    try:
        if store_id is None:
            await seen.recheck_all()
            return bool(seen.admitted)
        return await (seen.hears(store_id) if use else seen.recheck(store_id))
    except Exception as e:  # noqa: BLE001 - the response is already streaming: no error envelope can follow
        log.warning("event_stream_recheck_failed", error_type=type(e).__name__)
        seen.admitted.clear()
        return False
