"""The sidecar's Prometheus metrics, in its own registry (no global state).

The cache-hit path counts in plain integers (a prometheus_client increment takes a
lock: measurable at tens of thousands of hits a second); `render()` first runs the
`pending` callbacks that add what was counted since the last scrape, so every
scrape shows exact totals.
"""
from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class SidecarMetrics:
    def __init__(self, prefix: str = "skm_sidecar") -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{prefix}_requests", "local API requests", ["kind", "status"], registry=r)
        self.upstream = Counter(f"{prefix}_upstream_requests", "requests to key servers", ["outcome"], registry=r)
        self.cache_requests = Counter(f"{prefix}_cache_requests", "cacheable reads by outcome", ["outcome"],
                                      registry=r)
        self.cache_entries = Gauge(f"{prefix}_cache_entries", "cached values", registry=r)
        self.cache_bytes = Gauge(f"{prefix}_cache_bytes", "bytes charged to the cache", registry=r)
        self.app_credentials = Counter(f"{prefix}_app_credentials", "credential headers sent by local apps",
                                       ["header", "action"], registry=r)
        self.denials = Counter(f"{prefix}_local_denials", "local callers refused", ["reason"], registry=r)
        self.events = Counter(f"{prefix}_events", "key-change events received", ["kind"], registry=r)
        self.stream_connected = Gauge(f"{prefix}_event_stream_connected", "1 while the event stream is up",
                                      registry=r)
        self.reads = Counter(f"{prefix}_reads", "local-read records by what became of them (shipped to the "
                             "key server's audit, spooled to disk while it is away, refused by it)", ["outcome"],
                             registry=r)
        self.reads_dropped = Counter(f"{prefix}_reads_dropped", "local-read records lost (spool full, or a spool "
                                     "line that could not be opened); each loss is reported to the key server",
                                     registry=r)
        self.reads_spooled = Gauge(f"{prefix}_reads_spooled", "local-read records waiting on disk", registry=r)
        self.acks = Counter(f"{prefix}_acks", "version acknowledgements sent to the key server", ["outcome"],
                            registry=r)
        self.pending: list[Callable[[], None]] = []

    def flush(self) -> None:
        for add in self.pending:
            add()

    def render(self) -> web.Response:
        self.flush()
        resp = web.Response(body=generate_latest(self.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp
