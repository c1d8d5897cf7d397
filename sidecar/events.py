"""Push invalidation: follow the key server's event stream (SSE) and drop what changed.

A key event drops that key's cached values at once. An event about a key
store's access rules (or one without a key id) drops everything: the sidecar
does not track which store a cached key lives in, and such changes are rare.
On every (re)connect the cache is marked expired, since events may have been
missed while the stream was down; until the stream is back, TTL alone rules.
Reconnects back off exponentially with jitter.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Callable

import aiohttp

from server import logs
from sidecar.cache import Cache
from sidecar.upstream import Upstream, UpstreamUnavailable

log = logs.get("skm.sidecar.events")

KEY_EVENTS = {"secret_updated", "key_rotated", "key_created", "key_scheduled_deletion", "key_deletion_cancelled",
              "key_deleted"}
TOMBSTONE_EVENTS = {"key_scheduled_deletion", "key_deleted"}


class EventStream:
    def __init__(self, upstream: Upstream, cache: Cache, *, version: str, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, read_timeout: float = 45.0, metrics=None,
                 on_keystore: Callable[[int | None], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None) -> None:
        self.upstream = upstream
        self.cache = cache
        self.version = version
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.metrics = metrics
        self.on_keystore = on_keystore          # key-store membership index invalidation
        self.on_event = on_event                # (kind, data) after the cache has dropped what it names
        self.state = "stopped"                  # connecting | connected | down | stopped
        self.connected_since: float | None = None
        self.last_event: float | None = None
        self.reconnects = 0
        self.received = 0
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sidecar-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        self._set_state("stopped")

    def status(self) -> dict:
        return {"state": self.state, "reconnects": self.reconnects, "eventsReceived": self.received,
                "lastError": self.last_error,
                "connectedSeconds": None if self.connected_since is None
                else round(time.monotonic() - self.connected_since, 1)}

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.stream_connected.set(1 if state == "connected" else 0)

    async def _run(self) -> None:
        delay = self.backoff_initial
        while True:
            self._set_state("connecting")
            try:
                async with self.upstream.stream(self.version, "/events", self.read_timeout) as resp:
                    if resp.status != 200:
                        body = (await resp.read())[:300]
                        raise ConnectionError(f"HTTP {resp.status} {_message(body)}")
                    await self._follow(resp)
                    delay = self.backoff_initial       # it ran: the next failure starts the backoff afresh
                    self.last_error = "the key server closed the stream"
            except asyncio.CancelledError:
                raise
            except (UpstreamUnavailable, ConnectionError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                self.last_error = str(e) if isinstance(e, (ConnectionError, UpstreamUnavailable)) else type(e).__name__
            self.connected_since = None
            self._set_state("down")
            self.reconnects += 1
            log.info("event_stream_down", reason=self.last_error, retry_in=round(delay, 2))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.backoff_max)

    async def _follow(self, resp: aiohttp.ClientResponse) -> None:
        kind, data = None, []
        while True:
            line = await resp.content.readline()
            if not line:
                return                                   # EOF
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text == "":
                if kind is not None or data:
                    self._dispatch(kind or "message", "\n".join(data))
                kind, data = None, []
            elif text.startswith(":"):
                continue                                 # heartbeat / comment
            elif text.startswith("event:"):
                kind = text[6:].strip()
            elif text.startswith("data:"):
                data.append(text[5:].lstrip())

    def _dispatch(self, kind: str, data: str) -> None:
        self.last_event = time.monotonic()
        if kind == "hello":
            self.connected_since = time.monotonic()
            self.last_error = None
            self._set_state("connected")
            self.cache.expire_all()                      # anything may have changed while we were away
            if self.on_keystore:
                self.on_keystore(None)
            log.info("event_stream_connected")
            self._tell(kind, {})
            return
        self.received += 1
        if self.metrics is not None:
            self.metrics.events.labels(kind if kind in KEY_EVENTS or kind in ("reset", "auth_changed",
                                                                              "keystore_updated") else "other").inc()
        try:
            ev = json.loads(data) if data else {}
        except ValueError:
            ev = {}
        key_id = ev.get("key_id") if isinstance(ev, dict) else None
        keystore = ev.get("keystore_id") if isinstance(ev, dict) else None
        if kind in KEY_EVENTS and isinstance(key_id, str):
            if kind in TOMBSTONE_EVENTS:
                n = self.cache.tombstone(key_id)         # never an outage fallback again (sidecar/cache.py)
            elif kind == "key_deletion_cancelled":
                n = self.cache.revive(key_id)
            else:
                n = self.cache.drop_key(key_id)
            if kind in ("key_created", "key_deleted") and self.on_keystore:
                self.on_keystore(keystore if isinstance(keystore, int) else None)
            log.debug("invalidated", kind=kind, key_id=key_id, entries=n)
        else:
            self.cache.drop_all()
            if self.on_keystore:
                self.on_keystore(None)
            log.info("invalidated_all", kind=kind)
        self._tell(kind, ev if isinstance(ev, dict) else {})

    def _tell(self, kind: str, ev: dict) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, ev)
        except Exception:                                # a listener's bug must not end the stream
            log.exception("event_listener_failed", kind=kind)


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["header"]["resultMessage"])
    except (ValueError, KeyError, TypeError):
        return ""
