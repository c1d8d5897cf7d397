"""A key's last access time: written at most once a minute per key, off the request path."""
from __future__ import annotations

import asyncio
import time

from server import timeutil
from server.keys.context import KeyContext
from server.keys.model import Key

TOUCH_INTERVAL = 60.0          # seconds between last-access writes for one key
TOUCHED_MAX = 100_000


class LastAccess:
    def __init__(self, ctx: KeyContext) -> None:
        self.ctx = ctx
        self.pending: set[str] = set()             # key ids whose write is in flight
        self._touched: dict[str, float] = {}       # key id -> monotonic time its last access was known recent

    def touch(self, key: Key) -> None:
        """Record last access at most once a minute per key, off the request path."""
        mono = time.monotonic()
        seen = self._touched.get(key.id)
        if seen is not None and mono - seen < TOUCH_INTERVAL:
            return                                   # the common case: no date parsing per request
        last = timeutil.from_db(key.last_access_at)
        if last:
            age = (timeutil.now() - last).total_seconds()
            if 0 <= age < TOUCH_INTERVAL:
                self._remember(key.id, mono - age)
                return
        if key.id in self.pending:
            return
        self.pending.add(key.id)
        self._remember(key.id, mono)

        async def _write() -> None:
            try:
                await self.ctx.db.execute("UPDATE keys SET last_access_at = ? WHERE id = ?",
                                          timeutil.now_db(), key.id)
                self.ctx.meta.drop_key(key.id)     # the cached row's last access is now old
            except Exception:  # best effort: an access timestamp never fails a request
                pass
            finally:
                self.pending.discard(key.id)
        asyncio.get_running_loop().create_task(_write())

    def _remember(self, key_id: str, at: float) -> None:
        if len(self._touched) >= TOUCHED_MAX:     # bounded: forgetting only costs one date parse
            self._touched.clear()
        self._touched[key_id] = at
