"""Data-plane usage: requests and denials per minute, key store, key and result.

The hot path only increments a dict entry in memory (`Usage.count`, called by the data-plane
middleware); a background task flushes the counts every `flush_seconds` by an upsert that ADDS
to the stored count, so several workers and replicas share one table without overwriting each
other. Minutes older than `keep_minutes_hours` are rolled into hour rows, hour rows older than
`keep_hours_days` are dropped. Reads (console plots, `GET /api/v1/usage`) never scan the audit log.

Table `usage_minutes` (migration 10): `span` 1 = one minute, 60 = one hour; `minute` is the
bucket's start in minutes since the epoch; `key_id` is '' for requests that named only a store.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server import logs
from server.errors import InvalidRequest, SKMError
from server.runtime import CLIENT_CTX, KEY, request_value

log = logs.get("skm.usage")

RESULTS = ("ok", "denied", "error")
# range -> (minutes covered, bucket minutes)
RANGES = {"hour": (60, 1), "day": (24 * 60, 15), "month": (30 * 24 * 60, 24 * 60)}
_UPSERT = ("INSERT INTO usage_minutes (span, minute, keystore_id, key_id, result, count) VALUES (?, ?, ?, ?, ?, ?) "
           "ON CONFLICT (span, minute, keystore_id, key_id, result) DO UPDATE SET "
           "count = usage_minutes.count + excluded.count")


@dataclass(frozen=True)
class UsageSettings:
    """SKM_USAGE_* overrides (or ServerConfig.usage once the config carries it)."""
    enabled: bool = True
    flush_seconds: float = 5.0          # how stale the stored counts may be
    keep_minutes_hours: int = 48        # minute rows kept this long, then rolled into hours
    keep_hours_days: int = 35           # hour rows kept this long

    @classmethod
    def from_config(cls, config) -> "UsageSettings":
        found = getattr(config, "usage", None)
        if isinstance(found, cls):
            return found
        from server.config import build
        return build(cls, {}, os.environ, "SKM_USAGE_")


def result_of(status: int) -> str:
    if status < 400:
        return "ok"
    return "denied" if status in (401, 403, 429) else "error"


class Usage:
    def __init__(self, storage, settings: UsageSettings | None = None, metrics=None) -> None:
        self.db = storage
        self.settings = settings or UsageSettings()
        self.metrics = metrics
        self.pending: dict[tuple[int, int, str, str], int] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._children: dict[tuple[int, str], Any] = {}
        self._last_compact = 0.0

    # ------------------------------------------------------------ hot path
    def count(self, keystore_id: int, key_id: str | None, result: str, now: float | None = None) -> None:
        k = (int((now if now is not None else time.time()) // 60), keystore_id, key_id or "", result)
        self.pending[k] = self.pending.get(k, 0) + 1
        if self.metrics is not None:
            child = self._children.get((keystore_id, result))
            if child is None:
                # Per key store, never per key: label cardinality stays the number of stores.
                child = self._children[(keystore_id, result)] = self.metrics.keystore_requests.labels(
                    str(keystore_id), result)
            self.metrics.inc(child)

    def middleware(self):
        @web.middleware
        async def usage_mw(request: web.Request, handler):
            if self._task is None:
                # Started by the first request, so every worker process flushes its own counts.
                self._task = asyncio.get_running_loop().create_task(self.run(), name="usage-flush")
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                self._observe(request, status)
        return usage_mw

    def _observe(self, request: web.Request, status: int) -> None:
        key = request_value(request, KEY)
        if key is not None:
            self.count(key.keystore_id, key.id, result_of(status))
            return
        ks = request.match_info.get("keystoreid")
        if ks and (ks.isascii() and ks.isdigit()) and request_value(request, CLIENT_CTX) is not None:
            self.count(int(ks), None, result_of(status))

    # ------------------------------------------------------------ storage
    async def flush(self) -> int:
        """Add the pending counts to the table; on failure they are kept for the next flush."""
        async with self._lock:
            batch, self.pending = self.pending, {}
            if not batch:
                return 0
            rows = [(1, m, ks, key, res, n) for (m, ks, key, res), n in batch.items()]
            try:
                async with self.db.transaction() as tx:
                    for r in rows:
                        await tx.execute(_UPSERT, *r)
            except Exception as e:
                for k, n in batch.items():
                    self.pending[k] = self.pending.get(k, 0) + n
                log.warning("usage_flush_failed", error_type=type(e).__name__, rows=len(rows))
                return 0
            return len(rows)

    async def compact(self, now: float | None = None) -> None:
        """Roll old minutes into hours and drop old hours (one replica at a time)."""
        now_min = int((now if now is not None else time.time()) // 60)
        cut_m = now_min - self.settings.keep_minutes_hours * 60
        cut_m -= cut_m % 60                       # whole hours only
        cut_h = now_min - self.settings.keep_hours_days * 24 * 60
        if not await self.db.try_lock("usage-compact"):
            return
        try:
            async with self.db.transaction() as tx:
                old = await tx.fetchall("SELECT minute, keystore_id, key_id, result, count FROM usage_minutes "
                                        "WHERE span = 1 AND minute < ?", cut_m)
                hours: dict[tuple, int] = {}
                for r in old:
                    k = (r["minute"] - r["minute"] % 60, r["keystore_id"], r["key_id"], r["result"])
                    hours[k] = hours.get(k, 0) + r["count"]
                for (m, ks, key, res), n in hours.items():
                    await tx.execute(_UPSERT, 60, m, ks, key, res, n)
                await tx.execute("DELETE FROM usage_minutes WHERE span = 1 AND minute < ?", cut_m)
                await tx.execute("DELETE FROM usage_minutes WHERE span = 60 AND minute < ?", cut_h)
        finally:
            await self.db.unlock("usage-compact")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_seconds)
            try:
                await self.flush()
                if time.monotonic() - self._last_compact > 600:
                    self._last_compact = time.monotonic()
                    await self.compact()
            except asyncio.CancelledError:
                raise
            except Exception as e:     # a bad moment of the database: try again at the next tick
                log.warning("usage_job_failed", error_type=type(e).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        try:
            await self.flush()
        except SKMError:
            pass

    # ------------------------------------------------------------ reading
    async def series(self, *, range_: str = "day", keystore_id: int | None = None,
                     keystore_ids: list[int] | None = None, key_id: str | None = None,
                     now: float | None = None) -> dict:
        """Buckets of the range, oldest first: `{"start": ISO, "ok": n, "denied": n, "error": n}`."""
        if range_ not in RANGES:
            raise InvalidRequest("range is hour, day or month")
        total, step = RANGES[range_]
        now_min = int((now if now is not None else time.time()) // 60)
        end = now_min - now_min % step + step           # the current bucket is the last
        start = end - (total // step) * step
        where, args = ["minute >= ?", "minute < ?"], [start, end]
        if keystore_id is not None:
            where.append("keystore_id = ?"), args.append(keystore_id)
        if keystore_ids is not None:
            if not keystore_ids:
                keystore_ids = [-1]
            where.append(f"keystore_id IN ({', '.join('?' * len(keystore_ids))})"), args.extend(keystore_ids)
        if key_id is not None:
            where.append("key_id = ?"), args.append(key_id)
        rows = await self.db.fetchall(
            f"SELECT span, minute, result, SUM(count) AS n FROM usage_minutes WHERE {' AND '.join(where)} "
            "GROUP BY span, minute, result", *args)
        n_buckets = total // step
        buckets = [{"minute": start + i * step, "ok": 0, "denied": 0, "error": 0} for i in range(n_buckets)]
        for r in rows:
            m = int(r["minute"])
            if r["span"] == 60 and step < 60:
                continue          # hour rows cannot be split into finer buckets (only older than the range)
            i = (m - start) // step
            if 0 <= i < n_buckets and r["result"] in RESULTS:
                buckets[i][r["result"]] += int(r["n"])
        from server import timeutil
        import datetime as dt
        for b in buckets:
            b["start"] = timeutil.to_api(timeutil.to_db(dt.datetime.fromtimestamp(b.pop("minute") * 60,
                                                                                    dt.timezone.utc)))
        totals = {r: sum(b[r] for b in buckets) for r in RESULTS}
        return {"range": range_, "bucketMinutes": step, "buckets": buckets, "totals": totals}


def install(rt) -> None:
    settings = UsageSettings.from_config(rt.config)
    if not settings.enabled:
        rt.extra["usage"] = None
        return
    usage = Usage(rt.storage, settings, rt.metrics)
    rt.extra["usage"] = usage
    # Outermost of the data-plane observers after metrics: it sees the final status.
    rt.extra.setdefault("data_middlewares", []).insert(0, usage.middleware())

    async def stop(rt_) -> None:
        await usage.stop()

    rt.extra.setdefault("on_stop", []).append(stop)
