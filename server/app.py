"""Assemble the key server: runtime, the two aiohttp applications, listeners, jobs.

`KeyServer.start()` opens storage, starts both listeners *sealed*, then unseals
in the background (a remote system-key server may not be up yet); until then
every request but health answers 503 with the reason.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from server import logs, replication
from server.access.authdata import AuthData
from server.access.changes import ChangeGate
from server.access.authcache import CachedClientAccess
from server.access.lineage import seal_lineage
from server.access.operators import Operators
from server.access.seal import AccessSeal
from server.access.tls import server_context
from server.api import middleware
from server.api.routing import RouteTable
from server.api.timeouts import DeadlineAppRunner, DeadlineTCPSite
from server.barrier.barrier import Barrier
from server.barrier.keyring import SystemKeySource
from server.barrier.providers import make_provider
from server.barrier.remote import unseal_with_retry
from server.barrier.rootkey import RootKeyProvider
from server.barrier.sources import follow_keyring, system_key_source, unseal_once
from server.errors import ConfigError, SKMError
from server.events import EventBus
from server.keys import rollout
from server.keys.service import KeyService, Limits
from server.metrics import Metrics
from server.runtime import RUNTIME, Runtime
from server.settings import ServerConfig
from server.storage.factory import open_storage
from server.workers import WorkerPlace

log = logs.get("skm.server")
from server import VERSION  # noqa: E402,F401  (re-exported: server.app.VERSION)


def client_routes() -> RouteTable:
    from server.api.client import crypto_routes, manage_routes
    table = RouteTable()
    for mod in (crypto_routes, manage_routes):
        table.routes.extend(_prefixed(mod.routes))
    for extra in _optional_tables("client"):
        table.routes.extend(_prefixed(extra))
    return table


def mgmt_routes() -> RouteTable:
    from server.api.mgmt import auth_routes, key_routes, keystore_routes
    table = RouteTable()
    for mod in (keystore_routes, key_routes, auth_routes):
        table.routes.extend(_prefixed(mod.routes))
    for extra in _optional_tables("mgmt"):
        table.routes.extend(_prefixed(extra))
    return table


def _prefixed(t: RouteTable):
    import dataclasses
    return [dataclasses.replace(r, path=t.prefix + r.path) for r in t.routes]


def _optional_tables(plane: str) -> list[RouteTable]:
    """The route tables of the other API families (certificates, credentials, approvals, audit, ...)."""
    import importlib
    names = {
        "client": ["server.api.client.cert_routes", "server.api.client.oauth_routes",
                   "server.api.client.event_routes", "server.api.client.sidecar_routes"],
        "mgmt": ["server.api.mgmt.cert_routes", "server.api.mgmt.operator_routes", "server.api.mgmt.approval_routes",
                 "server.api.mgmt.audit_routes", "server.api.mgmt.system_routes",
                 "server.api.mgmt.credential_routes", "server.api.mgmt.version_routes",
                 "server.api.mgmt.usage_routes", "server.api.mgmt.backup_routes"],
    }[plane]
    return [importlib.import_module(name).routes for name in names]


async def _health(request: web.Request) -> web.Response:
    rt = request.config_dict[RUNTIME]
    if rt.barrier.sealed:
        return web.json_response({"status": "sealed", "sealed": True, "reason": rt.barrier.sealed_reason},
                                 status=503)
    body = {"status": "ok", "sealed": False}
    if "worker" in rt.extra:
        body["worker"] = rt.extra["worker"]     # which of several worker processes answered
    schedule = rt.extra.get("backup_schedule")
    if schedule is not None:
        # Still serving (200): an old backup is an operator's problem, not a reason to fail over.
        warning = schedule.warning()
        if warning:
            body["warnings"] = [f"backup: {warning}"]
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    return request.config_dict[RUNTIME].metrics.render()     # skm_sealed follows the barrier (build_runtime)


def build_apps(rt: Runtime) -> tuple[web.Application, web.Application]:
    max_body = rt.config.max_body_bytes
    # Audit and other observers sit outside the error middleware: they see the final status.
    data = web.Application(client_max_size=max_body, middlewares=[
        middleware.request_context, rt.metrics.middleware("data"), *rt.extra.get("data_middlewares", []),
        middleware.errors])
    data[RUNTIME] = rt
    client = client_routes()
    client.register(data)
    rt.extra["client_openapi"] = client.openapi("Secure Key Manager client API (NHN SKM compatible)", VERSION)
    data.router.add_get("/healthz", _health)
    data.router.add_get("/metrics", _metrics)

    mgmt = web.Application(client_max_size=max_body, middlewares=[
        middleware.request_context, rt.metrics.middleware("mgmt"), *rt.extra.get("mgmt_middlewares", []),
        middleware.errors])
    mgmt[RUNTIME] = rt
    middleware.add_hsts(mgmt, rt.config.hsts_max_age)
    table = mgmt_routes()
    table.register(mgmt)
    doc = table.openapi("Secure Key Manager management API", VERSION,
                        security={"bearer": {"type": "http", "scheme": "bearer"}})
    rt.extra["mgmt_openapi"] = doc

    async def openapi(_request: web.Request) -> web.Response:
        return web.json_response(doc)

    async def client_openapi(_request: web.Request) -> web.Response:
        return web.json_response(rt.extra["client_openapi"])

    mgmt.router.add_get("/api/v1/openapi.json", openapi)
    mgmt.router.add_get("/api/v1/client-openapi.json", client_openapi)
    mgmt.router.add_get("/healthz", _health)
    mgmt.router.add_get("/metrics", _metrics)
    if "console" in rt.extra:
        rt.extra["console"](mgmt)
    return data, mgmt


def build_runtime(config: ServerConfig, storage, barrier: Barrier | None = None) -> Runtime:
    barrier = barrier or Barrier()
    events = EventBus()
    seal = AccessSeal(storage, barrier)      # one key for every sealed row: operators, stores, entries, keys
    keys = KeyService(storage, barrier, events, Limits(min_auto_rotation_days=config.min_auto_rotation_days,
                                                       deletion_grace_days=config.deletion_grace_days,
                                                       material_cache_entries=config.material_cache_entries),
                      seal)
    authdata = AuthData(storage, events, seal, config.deletion_grace_days)
    # Auth data is cached per key store and dropped on every auth_changed event.
    rt = Runtime(config=config, storage=storage, barrier=barrier, keys=keys, events=events,
                 access=CachedClientAccess(storage, seal, config.trusted_proxies, events=events), authdata=authdata,
                 operators=Operators(storage, config.login, events, seal=seal), access_seal=seal, metrics=Metrics())
    rt.changes = ChangeGate(keys, authdata)
    metrics = rt.metrics

    def sealed_now() -> None:
        metrics.sealed.set(1 if barrier.sealed else 0)
    barrier.on_change.append(sealed_now)
    sealed_now()
    _extend_runtime(rt)
    return rt


def _extend_runtime(rt: Runtime) -> None:
    """Hooks for modules that add services (certificates, credentials, approvals, audit, console)."""
    import importlib
    for name in ("server.access.certificates", "server.access.callers", "server.access.approvals",
                 "server.audit", "server.access.seal", "server.usage", "server.console"):
        importlib.import_module(name).install(rt)


@dataclass
class KeyServer:
    config: ServerConfig
    runtime: Runtime | None = None
    data_port: int = 0
    mgmt_port: int = 0
    _runners: list[web.AppRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    root: RootKeyProvider | None = None
    source: SystemKeySource | None = None
    place: WorkerPlace | None = None       # set when this process is one of several workers (server/workers.py)

    async def start(self, *, wait_unsealed: bool = True) -> "KeyServer":
        cfg = self.config
        self.root = make_provider(cfg.rootkey, cfg.root_key_path())
        self.source = system_key_source(cfg)
        storage = open_storage(cfg.storage_url())
        await storage.open()
        try:
            await self._start(storage, wait_unsealed)
        except BaseException:
            # A half-started server must not keep the process alive (storage threads, listeners).
            if self.runtime is None:
                await storage.close()
            await self.stop()
            raise
        return self

    async def _start(self, storage, wait_unsealed: bool) -> None:
        cfg = self.config
        place = self.place
        rt = self.runtime = build_runtime(cfg, storage)
        channel = None
        if place is not None and place.count > 1 and getattr(storage, "dialect", "") != "postgresql":
            from server.workers import DatagramChannel
            channel = DatagramChannel(place.rundir, place.index, place.count)
            rt.extra["worker_channel"] = channel
        if place is not None:
            rt.extra["worker"] = place.index
            if place.count > 1 and getattr(storage, "dialect", "") == "postgresql" and rt.audit is not None:
                from server.audit.tip import FILE_NAME, SharedTip
                rt.audit.tip = SharedTip(place.rundir / FILE_NAME)
        # PostgreSQL: events reach every replica (and worker) via LISTEN/NOTIFY; SQLite workers: datagrams.
        relay = await replication.enable(rt, transport=channel)
        if relay is not None:
            # Several processes: a system-key version one of them picks up, all of them pick up.
            self._tasks.append(asyncio.create_task(follow_keyring(rt, log), name="keyring-follow"))
        if cfg.systemkey.source == "local":
            # A local keyring is there or not: a wrong root key stops the start here.
            await unseal_once(rt.barrier, self.source, self.root)
            await _seal_access(rt)
        else:
            self._tasks.append(asyncio.create_task(self._unseal_remote(), name="unseal"))
        data_app, mgmt_app = build_apps(rt)
        if place is None:
            self.data_port = await self._listen(data_app, "data", client_cert=True)
        else:
            self.data_port = await self._listen(data_app, "data", client_cert=True, port=place.data_port,
                                                reuse_port=True)
        rt.extra["data_port"] = self.data_port      # the console's connection panel names it
        if place is None or place.primary:
            # The management plane, console and background jobs run in one process only.
            self.mgmt_port = await self._listen(mgmt_app, "mgmt", client_cert=False)
            self._tasks.append(asyncio.create_task(self._jobs(), name="jobs"))
            if cfg.backup.dir:
                from server.backup.schedule import start_schedule
                self._tasks.append(start_schedule(rt))
            for hook in rt.extra.get("on_start", []):
                await hook(rt)
        from server.loops import loop_name
        log.info("listening", data_port=self.data_port, mgmt_port=self.mgmt_port, sealed=rt.barrier.sealed,
                 worker=None if place is None else place.index, event_loop=loop_name())
        if wait_unsealed and cfg.systemkey.source == "local":
            assert not rt.barrier.sealed

    async def _unseal_remote(self) -> None:
        """Unseal in the background; only a configuration error stops trying, and nothing ends silently."""
        rt = self.runtime
        sk = self.config.systemkey
        # The management routes (keyring refresh) reuse the same source and root key.
        rt.extra["systemkey_source"], rt.extra["rootkey"] = self.source, self.root
        while True:
            try:
                await unseal_with_retry(rt.barrier, self.source, self.root, initial=sk.retry_initial,
                                        maximum=sk.retry_max, log=log)
                log.info("unsealed", system_key_version=rt.barrier.current_version)
                await _seal_access(rt)
                return
            except ConfigError as e:
                rt.barrier.sealed_reason = f"cannot unseal: {e}"
                log.error("unseal_failed", reason=str(e))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug or odd failure must not leave a silent sealed server
                rt.barrier.sealed_reason = (f"waiting for the system key: unexpected {type(e).__name__}; "
                                            "see the key server log")
                log.exception("unseal_error", error_type=type(e).__name__)
                await asyncio.sleep(max(sk.retry_max, 0.1))

    async def _listen(self, app: web.Application, which: str, *, client_cert: bool, port: int | None = None,
                      reuse_port: bool = False) -> int:
        cfg = self.config
        cert, key, ca = cfg.listener_files(which)
        ctx = server_context(cert, key, ca if client_cert else None)
        # Header deadline (slow loris) and an explicit keep-alive idle limit (aiohttp's default is an hour).
        runner = DeadlineAppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2,
                                   header_timeout=cfg.header_timeout,
                                   keepalive_timeout=cfg.keepalive_timeout)
        await runner.setup()
        lc = getattr(cfg, which)
        site = DeadlineTCPSite(runner, lc.host, lc.port if port is None else port, ssl_context=ctx,
                               reuse_port=reuse_port, backlog=1024, handshake_timeout=cfg.handshake_timeout)
        await site.start()
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    async def _jobs(self) -> None:
        """Deletion purge and auto-rotation; one replica at a time (storage lock)."""
        rt = self.runtime
        while True:
            await asyncio.sleep(self.config.purge_interval)
            if rt.barrier.sealed:
                continue
            try:
                if await rt.storage.try_lock("skm-jobs"):
                    await run_jobs_once(rt)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_job_failed")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        if self.runtime is not None:
            for hook in self.runtime.extra.get("on_stop", []):
                await hook(self.runtime)
            self.runtime.metrics.close()       # the last second's counts (a worker's file outlives it)
            channel = self.runtime.extra.pop("worker_channel", None)
            if channel is not None:
                await channel.close()
            await self.runtime.storage.close()
        if self.root is not None:
            await self.root.close()
        if self.source is not None:
            await self.source.close()


async def _seal_access(rt: Runtime) -> None:
    """Load the access seal key once unsealed (sealing the rows of a fresh or upgraded database, and keeping
    lineage edges in operators' sealed rows), so the first login does not pay for it. A failure is logged;
    every credential check then refuses."""
    try:
        await rt.access_seal.key()
        await seal_lineage(rt.storage, rt.access_seal)
    except SKMError as e:
        log.error("access_seal_unavailable", error=str(e))


async def run_jobs_once(rt: Runtime, now=None) -> dict:
    purged = await rt.keys.purge_due(now)
    rotated = await rt.keys.rotate_due(now)
    auth_purged = await rt.authdata.purge_due(now)
    holdings_pruned = await rollout.prune(rt.storage, now)
    if purged or rotated or auth_purged or holdings_pruned:
        log.info("jobs_ran", purged=purged, rotated=rotated, auth_entries_purged=auth_purged,
                 holdings_pruned=holdings_pruned)
    return {"purged": purged, "rotated": rotated, "auth_purged": auth_purged, "holdings_pruned": holdings_pruned}


def data_dir_exists(config: ServerConfig) -> bool:
    return Path(config.data_dir).exists()
