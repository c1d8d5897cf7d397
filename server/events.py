"""In-process fan-out of key-store change events (sidecar SSE streams, console).

Replicas on PostgreSQL relay through LISTEN/NOTIFY into this bus.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Event:
    keystore_id: int
    kind: str            # secret_updated | key_rotated | key_created | key_scheduled_deletion |
                         # key_deletion_cancelled | key_deleted | auth_changed | keystore_updated
    key_id: str | None = None
    version: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Event":
        return cls(**json.loads(text))


class EventBus:
    def __init__(self, queue_size: int = 1000) -> None:
        self._subs: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size
        self.relay = None   # async callable(Event) set by a replicated backend

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self._subs.discard(q)

    def deliver(self, event: Event) -> None:
        for q in list(self._subs):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                # A subscriber that does not drain has lost events: replace its
                # backlog with one reset so it flushes everything it cached.
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(Event(keystore_id=0, kind="reset"))

    async def publish(self, event: Event) -> None:
        if self.relay is not None:
            await self.relay(event)      # the relay delivers locally when it hears it back
        else:
            self.deliver(event)
