"""Key-change events across key-server replicas through PostgreSQL LISTEN/NOTIFY.

`await enable(rt)` (called by KeyServer.start) does nothing on SQLite. On
PostgreSQL every event this replica publishes becomes a NOTIFY on one channel,
and every NOTIFY heard on it (its own included) is delivered to the local bus,
so each replica's SSE stream tells its sidecars about changes made anywhere.

NOTIFY is fire-and-forget: a replica whose LISTEN connection dropped misses
what was sent meanwhile. A heartbeat NOTIFY of our own, every few seconds,
shows whether the channel still reaches us; after a gap (heartbeat not heard
back, or a NOTIFY that failed) the local bus gets one `reset`, which makes
every sidecar flush its cache instead of serving something changed unheard.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from server import logs
from server.events import Event

log = logs.get("skm.replication")

CHANNEL = "skm_events"
HEARTBEAT_SECONDS = 5.0
PAYLOAD_LIMIT = 7900          # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more


@dataclass
class Relay:
    """One replica's end of the channel: publish as NOTIFY, deliver what is heard."""
    rt: object
    transport: object = None          # has listen/notify: the PostgreSQL storage, or a workers' DatagramChannel
    channel: str = CHANNEL
    heartbeat: float = HEARTBEAT_SECONDS
    ident: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    gap: bool = False                 # something may have been missed since the last reset
    last_heard: float = field(default_factory=time.monotonic)
    _seq: int = 0
    _task: asyncio.Task | None = None

    # -- outbound ----------------------------------------------------------
    async def publish(self, event: Event) -> None:
        payload = event.to_json()
        if len(payload.encode()) > PAYLOAD_LIMIT:
            # Cannot travel: every replica must drop what it cached instead.
            payload = Event(keystore_id=0, kind="reset").to_json()
        try:
            await self.transport.notify(self.channel, payload)
        except Exception as e:  # noqa: BLE001 - the change is committed; tell local subscribers anyway
            log.warning("event_notify_failed", kind=event.kind, error_type=type(e).__name__)
            self.gap = True
            self.rt.events.deliver(event)

    # -- inbound -----------------------------------------------------------
    def heard(self, payload: str) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            log.warning("event_payload_unreadable")
            return
        if isinstance(data, dict) and "ping" in data:
            if str(data["ping"]).startswith(self.ident + ":"):
                self.last_heard = time.monotonic()
                if self.gap:
                    self.gap = False
                    log.info("event_channel_restored")
                    self.rt.events.deliver(Event(keystore_id=0, kind="reset"))
            return
        try:
            event = Event(**data)
        except TypeError:
            log.warning("event_payload_unreadable")
            return
        self.rt.events.deliver(event)

    # -- liveness ----------------------------------------------------------
    async def _beat(self) -> None:
        while True:
            self._seq += 1
            with contextlib.suppress(Exception):
                await self.transport.notify(self.channel, json.dumps({"ping": f"{self.ident}:{self._seq}"}))
            await asyncio.sleep(self.heartbeat)
            if time.monotonic() - self.last_heard > 2 * self.heartbeat and not self.gap:
                log.warning("event_channel_silent", seconds=round(time.monotonic() - self.last_heard, 1))
                self.gap = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="event-relay-heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def enable(rt, *, heartbeat: float = HEARTBEAT_SECONDS, transport=None) -> Relay | None:
    """Relay rt.events through `transport` (the workers' channel), else through the database when it is
    PostgreSQL; None (nothing to do) for a single process on SQLite."""
    if transport is None:
        if getattr(rt.storage, "dialect", "") != "postgresql":
            return None
        transport = rt.storage
    relay = Relay(rt, transport, heartbeat=heartbeat)
    await transport.listen(relay.channel, relay.heard)
    rt.events.relay = relay.publish
    relay.start()
    rt.extra["replication"] = relay

    async def _stop(_rt) -> None:
        rt.events.relay = None
        await relay.stop()

    rt.extra.setdefault("on_stop", []).append(_stop)
    log.info("event_relay_enabled", channel=relay.channel)
    return relay
