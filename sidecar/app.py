"""Assemble and run the sidecar: attestation, upstream pool, cache, events, local endpoint.

The parts do not reach into each other (SPIRE's agent shape): the local API
asks the cache, the cache asks a fetch function, the event follower drops
cache entries; this module wires them and owns their lifetimes.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field

from server import logs
from server.loops import settle_heap
from sidecar.acks import Acks
from sidecar.attest import Attestor
from sidecar.cache import Cache
from sidecar.events import EventStream
from sidecar.fastpath import encode_tail
from sidecar.local_api import LocalAPI, Policy
from sidecar.metrics import SidecarMetrics
from sidecar.reads import ReadLog
from sidecar.render import Renderer
from sidecar.settings import SidecarConfig
from sidecar.upstream import Upstream
from sidecar.watch import ChangeFeed, watch_handler

log = logs.get("skm.sidecar")


@dataclass
class Sidecar:
    config: SidecarConfig
    metrics: SidecarMetrics = field(default_factory=SidecarMetrics)
    attestor: Attestor | None = None
    upstream: Upstream | None = None
    cache: Cache | None = None
    events: EventStream | None = None
    api: LocalAPI | None = None
    resolver: object | None = None        # an aiohttp resolver for the upstream names (tests); default getaddrinfo
    feed: ChangeFeed = field(default_factory=ChangeFeed)
    renderer: Renderer | None = None
    acks: Acks | None = None              # version acknowledgements (render adds its holdings here)
    reads: ReadLog | None = None          # local-read records for the key server's audit
    _sweeper: asyncio.Task | None = None

    async def start(self) -> "Sidecar":
        cfg = self.config.validate()
        self.attestor = Attestor(Upstream.first_host(cfg), cfg.attest.interface, cfg.attest.recheck)
        await self.attestor.start()
        self.upstream = Upstream(cfg, self.attestor, self.metrics, self.resolver)
        await self.upstream.start()
        c = cfg.cache
        self.cache = Cache(c.ttl, c.max_entries, c.max_bytes, c.stale_if_error, metrics=self.metrics,
                           encode=encode_tail)
        rules = cfg.rules()
        policy = Policy(rules, cfg.access_default, self.upstream, cfg.upstream.api_version, c.ttl) \
            if rules or cfg.access_default == "deny" else None
        if cfg.events.enabled:
            e = cfg.events
            self.events = EventStream(self.upstream, self.cache, version=cfg.upstream.api_version,
                                      backoff_initial=e.backoff_initial, backoff_max=e.backoff_max,
                                      read_timeout=e.read_timeout, metrics=self.metrics,
                                      on_keystore=policy.forget if policy else None, on_event=self._on_event)
        try:
            if cfg.acks.enabled:
                self.acks = Acks(self.upstream, cfg.upstream.api_version, cfg.acks.ttl, self.metrics)
            if cfg.reads.enabled:
                self.reads = ReadLog(cfg, self.upstream, self.metrics,
                                     on_delivered=self.acks.on_delivered if self.acks is not None else None)
                await self.reads.start()
            self.api = LocalAPI(cfg, self.upstream, self.cache, self.attestor, self.metrics, self.events, policy,
                                read_log=self.reads, acks=self.acks)
            self.api.routes.append(("GET", "/v1/watch", watch_handler(
                self.feed, self.api, lambda: self.events.state if self.events is not None else "disabled")))
            if cfg.render:
                self.renderer = Renderer(cfg.render, self.upstream, self.cache, self.metrics,
                                         version=cfg.upstream.api_version, ttl=c.ttl)
                self.api.reporters["render"] = self.renderer
                if self.acks is not None:
                    self.acks.add_source(self.renderer.holdings)
                    self.renderer.on_change = self.acks.poke
            await self.api.start()
            if self.renderer is not None:
                await self.renderer.start()
        except BaseException:
            await self.stop()
            raise
        if self.acks is not None:
            self.acks.start()
        if self.events is not None:
            self.events.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="sidecar-sweep")
        log.info("sidecar_started", socket=cfg.listen.socket, tcp_port=self.api.tcp_port,
                 upstreams=len(cfg.upstream.urls), mac=self.attestor.mac)
        return self

    def _on_event(self, kind: str, event: dict) -> None:
        self.feed.publish(kind, event)
        if self.renderer is not None:
            self.renderer.on_event(kind, event)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(self.config.cache.ttl, 30.0)))
            self.cache.sweep()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
            self._sweeper = None
        if self.renderer is not None:
            await self.renderer.stop()
        if self.events is not None:
            await self.events.stop()
        if self.api is not None:
            await self.api.stop()
        if self.reads is not None:
            await self.reads.stop()         # after the local API: no read goes unrecorded; before the upstream
            self.reads = None
        if self.acks is not None:
            await self.acks.stop()
        if self.upstream is not None:
            await self.upstream.close()
        if self.attestor is not None:
            await self.attestor.stop()
        if self.cache is not None:
            self.cache.drop_all()           # values live only in memory, and only while we run


async def run(config: SidecarConfig) -> int:
    logs.configure(config.log_format, config.log_level)
    sidecar = await Sidecar(config).start()
    settle_heap()
    print(f"sidecar: serving {config.listen.socket}"
          + (f" and http://127.0.0.1:{sidecar.api.tcp_port}" if sidecar.api.tcp_port else ""),
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop()
    return 0
