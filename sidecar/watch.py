"""`GET /v1/watch` on the sidecar's socket: wait until keys change, without reading them.

`skm run --restart-on-change` (and any local supervisor) asks here instead of polling values,
so the key server sees no reads and apps' read records stay meaningful:

    GET /v1/watch                               -> {"seq": N, "stream": "connected"}
    GET /v1/watch?key=<id>&key=<id>&since=N&timeout=30
        -> as soon as an event after N concerns one of the keys (or anything: a reconnect, a reset,
           an access change), or when the timeout passes:
           {"seq": M, "changed": ["<id>", ...], "all": false, "stream": "connected"}

The sidecar keeps the last `keep` events; a `since` older than that answers `"all": true`.
Answers carry key ids and event order, never a value; the local allow-list applies per key.
"""
from __future__ import annotations

import asyncio
import re
from collections import deque

from aiohttp import web

from server.errors import InvalidRequest

_KEY = re.compile(r"[0-9a-f]{32}")
MAX_KEYS = 64
MAX_TIMEOUT = 300.0


class ChangeFeed:
    def __init__(self, keep: int = 4096) -> None:
        self.seq = 0
        self._log: deque[tuple[int, str | None]] = deque(maxlen=keep)    # (seq, key id | None = anything)
        self._bell = asyncio.Event()

    def publish(self, kind: str, event: dict) -> None:
        key_id = event.get("key_id") if isinstance(event, dict) else None
        self.seq += 1
        self._log.append((self.seq, key_id if isinstance(key_id, str) and kind.startswith(("key_", "secret_"))
                          else None))
        bell, self._bell = self._bell, asyncio.Event()
        bell.set()

    def since(self, seq: int, keys: frozenset[str]) -> tuple[set[str], bool]:
        """(changed keys among `keys`, whether anything may have changed) after `seq`."""
        if seq > self.seq:
            return set(), True                  # a number from before the sidecar restarted
        if seq < self.seq and (not self._log or self._log[0][0] > seq + 1):
            return set(), True                  # events after `seq` were dropped from the log
        changed, everything = set(), False
        for s, k in reversed(self._log):
            if s <= seq:
                break
            if k is None:
                everything = True
            elif k in keys:
                changed.add(k)
        return changed, everything

    async def wait(self, seq: int, keys: frozenset[str], timeout: float) -> tuple[set[str], bool]:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            changed, everything = self.since(seq, keys)
            left = end - loop.time()
            if changed or everything or left <= 0:
                return changed, everything
            bell = self._bell
            try:
                await asyncio.wait_for(bell.wait(), left)
            except asyncio.TimeoutError:
                pass


def watch_handler(feed: ChangeFeed, api, stream_state):
    """The route's handler; `api` is the LocalAPI (its allow-list applies), `stream_state()` the stream's state."""
    from sidecar.local_api import CALLER, Target

    async def watch(request: web.Request) -> web.Response:
        q = request.query
        if "since" not in q:
            return web.json_response({"seq": feed.seq, "stream": stream_state()})
        keys = q.getall("key", [])
        if not 1 <= len(keys) <= MAX_KEYS or not all(_KEY.fullmatch(k) for k in keys):
            raise InvalidRequest(f"name 1 to {MAX_KEYS} keys as key=<32 hex key id>")
        raw_since, raw_timeout = q.get("since", ""), q.get("timeout", "30")
        if not raw_since.isdigit():
            raise InvalidRequest("since must be a sequence number from an earlier answer")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = -1.0
        if not 0 <= timeout <= MAX_TIMEOUT:
            raise InvalidRequest(f"timeout must be 0 to {MAX_TIMEOUT:g} seconds")
        if api.policy is not None:
            caller = request[CALLER]
            for k in keys:
                await api.policy.check(caller, Target(api.cfg.upstream.api_version, f"/secrets/{k}", k, None))
        changed, everything = await feed.wait(int(raw_since), frozenset(keys), timeout)
        return web.json_response({"seq": feed.seq, "changed": sorted(changed), "all": everything,
                                  "stream": stream_state()})

    return watch
