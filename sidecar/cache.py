"""A brief in-memory cache of secret values and public keys, nothing else.

Never the result of encrypt/decrypt/sign: those are not cacheable reads. An
entry is fresh for `ttl` seconds. Bounded by entries and by bytes (LRU).
Concurrent misses of one entry share one upstream request (singleflight).
When the key server fails (unreachable or 5xx), an entry up to
`stale_if_error` seconds old is served marked stale; older, the error stands.
A push event drops a key's entries at once; a fetch that raced a drop is not
stored, so a value the server has replaced never comes back from the cache.
A key scheduled for deletion or deleted (its event), or refused by the server
(403/404/409/410), is tombstoned: its entries go and, until the server hands
out its value again (or a cancellation event), stale-if-error never serves it:
only a key whose last known state was ACTIVE is an outage fallback.
Values live only in this process's memory.

A reader may pass `encode(body, content_type) -> bytes` (the local API's encoded
response: its fixed headers and the body, built once per entry); the bytes live and
die with the entry (replaced on refill, dropped by TTL eviction, push events and
drops) and count against the byte bound. `peek()` is the synchronous hit check the
local fast path uses; everything else goes through `get()`.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from sidecar.upstream import UpstreamResponse, UpstreamUnavailable

ENTRY_OVERHEAD = 256          # bytes charged per entry for its key, headers and bookkeeping
# The server's answers that say the key itself may not be handed out (refused, gone, not in service).
_KEY_REFUSED = frozenset({403, 404, 409, 410})


@dataclass(eq=False)           # identity hash: the read log counts reads per entry
class Entry:
    key_id: str
    body: bytes
    content_type: str
    fetched: float              # monotonic
    expired: bool = False       # set when events may have been missed: usable only as an outage fallback
    wire: bytes = b""           # the reader's encoding of this entry (Cache(encode=...)), built once
    version: int | None = None  # the key version the value is of (UpstreamResponse.version)
    tag: str = ""               # what kind of value (the reader's label, for the read log)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.wire) + ENTRY_OVERHEAD


@dataclass
class Result:
    status: int
    body: bytes
    content_type: str
    source: str                 # hit | miss | stale | pass (not stored: an error answer)
    age: float = 0.0
    version: int | None = None


Fetch = Callable[[], Awaitable[UpstreamResponse]]
Encode = Callable[[bytes, str], bytes]


class Cache:
    def __init__(self, ttl: float = 30.0, max_entries: int = 10_000, max_bytes: int = 16 << 20,
                 stale_if_error: float = 300.0, metrics=None, clock=time.monotonic,
                 encode: Encode | None = None) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stale_if_error = stale_if_error
        self.metrics = metrics
        self.clock = clock
        self.encode = encode
        # Misses and stale answers count straight into Prometheus; hits (the hot path) in self.hits,
        # added to the metric when it is scraped (SidecarMetrics.pending).
        self._counters = {w: metrics.cache_requests.labels(w) for w in ("miss", "stale")} \
            if metrics is not None else {}
        self._hits_exported = 0
        if metrics is not None:
            metrics.pending.append(self._export_hits)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self._gen: dict[str, int] = {}        # per key id with a fill in flight, bumped by a drop meanwhile
        self._filling: dict[str, int] = {}    # key id -> fills in flight (only those can race with a drop)
        self._epoch = 0                       # bumped by drop_all / expire_all
        # Key ids last known not ACTIVE (tombstones; LRU, bounded like the entries): never served stale.
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.stale = 0

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses + self.stale
        return None if total == 0 else (self.hits + self.stale) / total

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "maxEntries": self.max_entries,
                "maxBytes": self.max_bytes, "ttlSeconds": self.ttl, "staleIfErrorSeconds": self.stale_if_error,
                "hits": self.hits, "misses": self.misses, "staleServed": self.stale,
                "tombstones": len(self._tombstones),
                "hitRatio": self.hit_ratio}

    def peek(self, ckey: str) -> tuple[Entry, float] | None:
        """(entry, age) when `ckey` is a fresh hit, counted as one; None otherwise (then call get())."""
        e = self._entries.get(ckey)
        if e is None or e.expired:
            return None
        age = self.clock() - e.fetched
        if age >= self.ttl:
            return None
        self._entries.move_to_end(ckey)
        self._count("hit")
        return e, age

    async def get(self, ckey: str, key_id: str, fetch: Fetch, tag: str = "") -> Result:
        hit = self.peek(ckey)
        if hit is not None:
            e, age = hit
            return Result(200, e.body, e.content_type, "hit", age, e.version)
        fut = self._inflight.get(ckey)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[ckey] = fut
        try:
            result = await self._fill(ckey, key_id, fetch, tag)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()       # mark retrieved: waiters may be none
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            self._inflight.pop(ckey, None)

    async def _fill(self, ckey: str, key_id: str, fetch: Fetch, tag: str = "") -> Result:
        self._filling[key_id] = self._filling.get(key_id, 0) + 1
        try:
            return await self._fill_once(ckey, key_id, fetch, tag)
        finally:
            left = self._filling[key_id] - 1
            if left:
                self._filling[key_id] = left
            else:                      # nothing in flight: no generation to remember (bounded by fills)
                del self._filling[key_id]
                self._gen.pop(key_id, None)

    async def _fill_once(self, ckey: str, key_id: str, fetch: Fetch, tag: str = "") -> Result:
        gen, epoch = self._gen.get(key_id, 0), self._epoch
        try:
            resp = await fetch()
        except UpstreamUnavailable:
            stale = self._stale(ckey)
            if stale is None:
                raise
            return stale
        if resp.status == 200:
            self._count("miss")
            version = getattr(resp, "version", None)
            if self._gen.get(key_id, 0) == gen and self._epoch == epoch:
                e = Entry(key_id, resp.body, resp.content_type, self.clock(), version=version, tag=tag)
                if self.encode is not None:
                    e.wire = self.encode(e.body, e.content_type)
                self._store(ckey, e)
                self._tombstones.pop(key_id, None)   # fetched after any tombstone: the server hands it out
            return Result(200, resp.body, resp.content_type, "miss", 0.0, version)
        if resp.server_error:
            stale = self._stale(ckey)
            if stale is not None:
                return stale
        elif resp.status in _KEY_REFUSED:
            self.tombstone(key_id)    # deleted, not in service, access revoked: none of its values may serve
        else:
            self._remove(ckey)        # this request was wrong (400...): forget its entry
        return Result(resp.status, resp.body, resp.content_type, "pass")

    def _stale(self, ckey: str) -> Result | None:
        e = self._entries.get(ckey)
        if e is None:
            return None
        age = self.clock() - e.fetched
        if age > self.stale_if_error or e.key_id in self._tombstones:
            self._remove(ckey)
            return None
        self._count("stale")
        return Result(200, e.body, e.content_type, "stale", age, e.version)

    # ------------------------------------------------------------ writing
    def _store(self, ckey: str, e: Entry) -> None:
        if e.size > self.max_bytes:
            return                    # never cacheable within the bound
        self._remove(ckey)
        self._entries[ckey] = e
        self._by_key.setdefault(e.key_id, set()).add(ckey)
        self.bytes += e.size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            old, _ = next(iter(self._entries.items()))
            self._remove(old)
        self._gauge()

    def _remove(self, ckey: str) -> None:
        e = self._entries.pop(ckey, None)
        if e is None:
            return
        self.bytes -= e.size
        keys = self._by_key.get(e.key_id)
        if keys is not None:
            keys.discard(ckey)
            if not keys:
                del self._by_key[e.key_id]
        self._gauge()

    def drop_key(self, key_id: str) -> int:
        """A push event or a write through the sidecar: this key's values are no longer current."""
        if key_id in self._filling:   # a fill that started before this drop must not store its answer
            self._gen[key_id] = self._gen.get(key_id, 0) + 1
        n = 0
        for ckey in list(self._by_key.get(key_id, ())):
            self._remove(ckey)
            n += 1
        return n

    def tombstone(self, key_id: str) -> int:
        """The key was scheduled for deletion, deleted or refused: drop its values at once and serve none of
        them stale until a value is fetched again (or `revive`)."""
        n = self.drop_key(key_id)
        self._tombstones[key_id] = None
        self._tombstones.move_to_end(key_id)
        while len(self._tombstones) > self.max_entries:
            self._tombstones.popitem(last=False)
        return n

    def revive(self, key_id: str) -> int:
        """The key's deletion was cancelled: it is ACTIVE again (its values are fetched afresh)."""
        self._tombstones.pop(key_id, None)
        return self.drop_key(key_id)

    def tombstoned(self, key_id: str) -> bool:
        return key_id in self._tombstones

    def drop_all(self) -> int:
        n = len(self._entries)
        self._epoch += 1
        self._entries.clear()
        self._by_key.clear()
        self.bytes = 0
        self._gauge()
        return n

    def expire_all(self) -> None:
        """Make every entry stale (kept only as an outage fallback): events may have been missed."""
        self._epoch += 1
        for e in self._entries.values():
            e.expired = True

    def sweep(self) -> int:
        """Forget entries too old even to serve stale."""
        now = self.clock()
        old = [k for k, e in self._entries.items() if now - e.fetched > max(self.ttl, self.stale_if_error)]
        for k in old:
            self._remove(k)
        return len(old)

    # ------------------------------------------------------------ metrics
    def _count(self, what: str) -> None:
        if what == "hit":
            self.hits += 1
        elif what == "miss":
            self.misses += 1
        else:
            self.stale += 1
        c = self._counters.get(what)
        if c is not None:
            c.inc()

    def _export_hits(self) -> None:
        n, self._hits_exported = self.hits - self._hits_exported, self.hits
        if n:
            self.metrics.cache_requests.labels("hit").inc(n)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_entries.set(len(self._entries))
            self.metrics.cache_bytes.set(self.bytes)
