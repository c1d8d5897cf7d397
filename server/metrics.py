"""Prometheus metrics, one registry per process object (no global registry).

With `workers > 1` each worker counts in its own process, and a scrape reaches whichever worker the
kernel gave the connection: alone, its numbers would jump between the workers' own and rates would be
nonsense. So the supervisor gives every worker one directory (`PROMETHEUS_MULTIPROC_DIR`, set before
prometheus_client loads), where prometheus_client's multiprocess mode keeps each worker's values in a
file of its own, and every scrape, on any worker or plane, adds them up: counters and histograms summed
(a dead worker's counts stay, so they never go down), gauges by the mode each names (`livemax`: the
largest of the live workers', `livesum`: their sum).

An update there writes the worker's memory-mapped file under a lock: four a request (its counter, the
latency histogram's sum and bucket, its key store's counter), 8.6 µs per request in a py-spy profile of two
workers against 2.9 µs in one process's memory. So the request path only counts in memory (`inc`, and
each plane's list of latencies), and `flush()` adds the counts to the metrics at most `FLUSH_SECONDS`
later, each once (a histogram's values by bucket), before every scrape of its own process, and at stop.
A scrape therefore sees its own worker's requests up to the moment and the other workers' up to a second
ago; a worker killed outright (SIGKILL) takes its last second's counts with it.
"""
from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.workers import SHARED_DIR_ENV       # set by the supervisor for its workers


FLUSH_SECONDS = 1.0


class Metrics:
    def __init__(self, prefix: str = "skm") -> None:
        self._counts: dict[Any, float] = {}           # counter child -> increments not yet flushed
        self._observed: dict[Any, list[float]] = {}   # histogram child -> values not yet flushed
        self._timer: asyncio.TimerHandle | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_dir = os.environ.get(SHARED_DIR_ENV) or None      # the workers' directory, if any
        self.requests = Counter(f"{prefix}_http_requests", "HTTP requests", ["plane", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram(f"{prefix}_http_request_seconds", "HTTP request latency", ["plane"],
                                 registry=self.registry,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        # Gauges only worker 0 sets (jobs, rewrap, backups) or that any worker may set: the live maximum.
        live_max = {"registry": self.registry, "multiprocess_mode": "livemax"}
        self.sealed = Gauge(f"{prefix}_sealed", "1 while the barrier is sealed (on any worker)", **live_max)
        self.rewrap_done = Gauge(f"{prefix}_rewrap_records_done", "records re-sealed by the running rewrap",
                                 **live_max)
        self.rewrap_total = Gauge(f"{prefix}_rewrap_records_total", "records the running rewrap must re-seal",
                                  **live_max)
        self.backup_last_success = Gauge(f"{prefix}_backup_last_success_timestamp",
                                         "Unix time of the last successful scheduled backup", **live_max)
        self.backup_last_size = Gauge(f"{prefix}_backup_last_size_bytes", "size of the last successful scheduled "
                                      "backup", **live_max)
        self.backup_last_seconds = Gauge(f"{prefix}_backup_last_duration_seconds", "how long the last successful "
                                         "scheduled backup took", **live_max)
        self.backup_failures = Counter(f"{prefix}_backup_failures", "scheduled backups that failed",
                                       registry=self.registry)
        self.denials = Counter(f"{prefix}_access_denials", "client requests refused by key-store checks",
                               ["reason"], registry=self.registry)
        self.seal_failures = Counter(f"{prefix}_access_seal_failures", "operator, role, token and access-key rows "
                                     "refused because their seal did not match (changed outside the key server)",
                                     ["table"], registry=self.registry)
        # Per key store (its id), never per key: label cardinality stays the number of stores.
        self.keystore_requests = Counter(f"{prefix}_keystore_requests", "client requests per key store and result "
                                         "(ok, denied, error)", ["keystore", "result"], registry=self.registry)

        # The audit writer of this process (server/audit/log.py): how fast its group commits land, what
        # failed (with fail_closed, the default, each failed batch's requests were answered 503) and, on
        # PostgreSQL, how often a batch's statement was refused: another worker or replica moved the head
        # first (the batch is chained again), or it overtook the batch it was chained after (sent again).
        self.audit_records = Counter(f"{prefix}_audit_records", "audit records committed", registry=self.registry)
        self.audit_batch_seconds = Histogram(f"{prefix}_audit_batch_seconds", "time to commit one audit batch",
                                             registry=self.registry,
                                             buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.audit_write_failures = Counter(f"{prefix}_audit_write_failures", "audit batches that failed to commit",
                                            registry=self.registry)
        self.audit_head_moved = Counter(f"{prefix}_audit_head_moved", "audit statements refused because another "
                                        "writer moved the head first, or sent before the batch they follow "
                                        "(PostgreSQL)", registry=self.registry)
        self.audit_held = Gauge(f"{prefix}_audit_held_records", "audit records held in memory while the barrier "
                                "is sealed", registry=self.registry, multiprocess_mode="livesum")

    def middleware(self, plane: str):
        # Children looked up once per (route, status): labels() validates and locks on every call.
        # Bounded by the route tables times the statuses this server answers.
        counters: dict[tuple[str, int], Any] = {}
        latency = self.latency.labels(plane)
        counts = self._counts
        latencies = self._observed.setdefault(latency, [])

        @web.middleware
        async def measure(request: web.Request, handler):
            start = time.perf_counter()
            resp = await handler(request)
            resource = request.match_info.route.resource
            route = resource.canonical if resource else "unmatched"
            child = counters.get((route, resp.status))
            if child is None:
                child = counters[(route, resp.status)] = self.requests.labels(plane, route, str(resp.status))
            counts[child] = counts.get(child, 0) + 1
            latencies.append(time.perf_counter() - start)
            if self._timer is None:
                self._arm()
            return resp
        return measure

    # ------------------------------------------------------------ deferred updates
    def inc(self, child: Any, amount: float = 1) -> None:
        """`child.inc(amount)` at the next flush (a labelled counter child)."""
        self._counts[child] = self._counts.get(child, 0) + amount
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._timed_flush)
        except RuntimeError:            # no loop (a script or a test counting by hand): at once
            self.flush()

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Add what the request path counted since the last flush; each metric is written once."""
        counts = self._counts
        if counts:
            pending = list(counts.items())
            counts.clear()                  # the same dict: the middlewares hold it
            for child, n in pending:
                child.inc(n)
        for child, values in self._observed.items():
            if values:
                pending_values = values[:]
                values.clear()
                _observe_all(child, pending_values)

    def close(self) -> None:
        """At stop: nothing counted may be lost with the process (a worker's file outlives it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def render(self) -> web.Response:
        resp = web.Response(body=self.exposition())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's added up."""
        self.flush()
        if self.shared_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector
        every = CollectorRegistry()
        MultiProcessCollector(every, path=self.shared_dir)
        return generate_latest(every)


def _observe_all(child: Any, values: list[float]) -> None:
    """`child.observe(v)` for every value, writing its sum once and each bucket it fills once.

    Reaches into prometheus_client's Histogram child (`_upper_bounds`, `_buckets`, `_sum`, what its own
    `observe` uses); should those ever change, every value is observed one by one. tests/test_metrics.py
    holds the exposition equal to that of values observed one by one."""
    bounds, buckets, total = (getattr(child, "_upper_bounds", None), getattr(child, "_buckets", None),
                              getattr(child, "_sum", None))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    filled = [0] * len(bounds)
    for v in values:
        filled[bisect_left(bounds, v)] += 1         # the first bound >= v, as Histogram.observe picks it
    total.inc(sum(values))
    for i, n in enumerate(filled):
        if n:
            buckets[i].inc(n)
