"""Deliver secrets to programs that read files: `[[render]]` blocks rendered, kept current, reloaded.

Each block has a task: it renders at start, again when the key server's event stream says a key
it used changed (or access rules changed, or the stream reconnected: events may have been missed),
and every `cache.ttl` seconds as a fallback; failures retry sooner (backoff up to the TTL). A burst
of triggers within `debounce` seconds makes one render. Reads go through the sidecar's cache (the
same entries apps read, dropped by the same events).

When the rendered bytes differ from what the reader had, the file is replaced atomically
(sidecar.filewrite) and the block's reload action runs once. A key the server refuses or no longer
has fails closed: nothing is written, and a file rendered earlier is removed (the host may no longer
hold that key); a key server that does not answer leaves the last good file in place. Either way
the failure is logged (reference and reason, never a value), counted, and `/healthz` answers 503.

`Renderer.delivered()` says, per block, which (key id, version) pairs the file holds, when they were
delivered and how the last reload went: the version roll-out reporter reads it.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from server import logs, timeutil
from sidecar import filewrite
from sidecar.keyref import KeyInfo, KeyRef, KeyUnavailable, Resolver, parse_body, refusal
from sidecar.reload import ReloadOutcome, run_reload
from sidecar.render_config import ReloadAction, RenderConfig
from sidecar.templates import (MAX_OUTPUT, Rendering, TemplateFailed, compile_template, data_key_b64,
                               pem_public_key)
from sidecar.upstream import UpstreamUnavailable

log = logs.get("skm.sidecar.render")

# Events after which anything may have changed for any block.
ALL_EVENTS = frozenset({"hello", "reset", "auth_changed", "keystore_updated"})
NAME_EVENTS = frozenset({"key_created", "key_deleted", "keystore_updated", "reset", "hello"})


@dataclass(frozen=True)
class RenderedKey:
    ref: str                        # as the template names it (id or store/name)
    key_id: str
    version: int | None             # the key's current version when it was read (None: not reported)


@dataclass(frozen=True)
class Delivery:
    """What one block's file holds and how its reader was last told (for status and the roll-out reporter)."""
    name: str
    destination: str
    keys: tuple[RenderedKey, ...]
    delivered_at: str | None        # UTC: when the file last received content that differed
    rendered_at: str | None         # UTC: the last successful render (changed or not)
    reload: ReloadOutcome | None
    error: str | None               # why the last render failed (None: it did not)
    failures: int                   # consecutive failed renders

    def to_json(self) -> dict:
        return {"name": self.name, "destination": self.destination,
                "keys": [{"ref": k.ref, "keyId": k.key_id, "version": k.version} for k in self.keys],
                "deliveredAt": self.delivered_at, "renderedAt": self.rendered_at,
                "reload": self.reload.to_json() if self.reload else None, "error": self.error,
                "failures": self.failures}


class RenderMetrics:
    def __init__(self, registry, prefix: str = "skm_sidecar") -> None:
        self.renders = Counter(f"{prefix}_renders", "template renders by outcome (written, unchanged, failed, "
                               "removed)", ["block", "outcome"], registry=registry)
        self.reloads = Counter(f"{prefix}_render_reloads", "reload actions run after a rendered file changed",
                               ["block", "action", "outcome"], registry=registry)
        self.failing = Gauge(f"{prefix}_render_failing", "1 while a block's last render failed", ["block"],
                             registry=registry)
        self.delivered = Gauge(f"{prefix}_render_delivered_timestamp_seconds",
                               "when a block's file last received new content", ["block"], registry=registry)


def _utc() -> str:
    return timeutil.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Block:
    cfg: RenderConfig
    template: object
    path: Path
    mode: int
    uid: int | None
    gid: int | None
    action: ReloadAction | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    key_ids: frozenset[str] = frozenset()
    uses_names: bool = False
    written: filewrite.Written | None = None       # the file as we last left it
    digest: bytes | None = None                    # SHA-256 of what the reader has (what we wrote, or found)
    keys: tuple[RenderedKey, ...] = ()
    delivered_at: str | None = None
    rendered_at: str | None = None
    reload: ReloadOutcome | None = None
    error: str | None = None
    failures: int = 0
    renders: int = 0
    busy: bool = False
    task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.cfg.label

    def delivery(self) -> Delivery:
        return Delivery(self.name, str(self.path), self.keys, self.delivered_at, self.rendered_at, self.reload,
                        self.error, self.failures)


class Renderer:
    def __init__(self, blocks: tuple[RenderConfig, ...], upstream, cache, metrics, *, version: str = "v1.0",
                 ttl: float = 30.0) -> None:
        self.upstream = upstream
        self.cache = cache
        self.version = version
        self.ttl = ttl
        self.metrics = RenderMetrics(metrics.registry)
        self.resolver = Resolver(self._inventory, ttl)
        self.blocks = [Block(c, compile_template(c.template_text(), c.label), c.destination_path(), c.mode_bits(),
                             c.uid(), c.gid(), c.reload_action()) for c in blocks]
        self.on_change = None           # called after a file got new content (the roll-out reports soon)

    # ------------------------------------------------------------ lifetime
    async def start(self) -> None:
        for b in self.blocks:
            kind = await asyncio.to_thread(filewrite.filesystem_type, b.path.parent)
            if kind not in ("tmpfs", "ramfs"):
                log.warning("render_destination_not_tmpfs", block=b.name, destination=str(b.path), fs=kind,
                            hint="the rendered secret reaches a disk; prefer a directory on tmpfs such as /run")
            if b.path.parent.stat().st_mode & 0o002:
                log.warning("render_destination_shared_dir", block=b.name, destination=str(b.path),
                            hint="a world-writable (sticky) directory: another user can block the file's "
                                 "replacement; prefer a directory only the sidecar writes")
            existing = await asyncio.to_thread(filewrite.read_existing, b.path, MAX_OUTPUT)
            b.digest = hashlib.sha256(existing).digest() if existing is not None else None
            self.metrics.failing.labels(b.name).set(0)
        # First renders together: a slow key server delays start once, not once per block.
        await asyncio.gather(*(self._render(b, "start") for b in self.blocks))
        for b in self.blocks:
            b.task = asyncio.create_task(self._loop(b), name=f"sidecar-render-{b.name}")

    async def stop(self) -> None:
        for b in self.blocks:
            if b.task is not None:
                b.task.cancel()
                with contextlib.suppress(BaseException):
                    await b.task
                b.task = None

    # ------------------------------------------------------------ what others read
    def delivered(self) -> list[Delivery]:
        return [b.delivery() for b in self.blocks]

    def status(self) -> list[dict]:
        return [b.delivery().to_json() for b in self.blocks]

    def holdings(self) -> list[tuple[str, int, float | None, bool | None]]:
        """(key id, version, delivered at (epoch seconds), reload ok) of every rendered key: a source of
        the roll-out acknowledgements (sidecar/acks.py)."""
        import datetime as dt
        out = []
        for d in self.delivered():
            at = None
            if d.delivered_at:
                at = dt.datetime.strptime(d.delivered_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=dt.timezone.utc).timestamp()
            ok = None if d.reload is None else d.reload.outcome == "ok"
            out += [(k.key_id, k.version, at, ok) for k in d.keys if k.version is not None]
        return out

    def problem(self) -> str | None:
        bad = [b for b in self.blocks if b.error is not None]
        if not bad:
            return None
        return "; ".join(f"render block {b.name!r}: {b.error}" for b in bad)

    def idle(self) -> bool:
        """No render running or pending (tests wait for this before counting reloads)."""
        return all(not b.busy and not b.wake.is_set() for b in self.blocks)

    # ------------------------------------------------------------ triggers
    def on_event(self, kind: str, event: dict) -> None:
        if kind in NAME_EVENTS:
            self.resolver.forget()
        key_id = event.get("key_id") if isinstance(event, dict) else None
        for b in self.blocks:
            if (kind in ALL_EVENTS or not isinstance(key_id, str) or key_id in b.key_ids or b.error is not None
                    or (kind in NAME_EVENTS and b.uses_names)):
                b.wake.set()

    def trigger(self, name: str | None = None) -> None:
        for b in self.blocks:
            if name is None or b.name == name:
                b.wake.set()

    async def _loop(self, b: Block) -> None:
        while True:
            wait = self.ttl if b.error is None else min(self.ttl, 0.5 * 2 ** min(b.failures, 8))
            try:
                await asyncio.wait_for(b.wake.wait(), wait * (0.9 + random.random() / 5))
                reason = "change"
            except asyncio.TimeoutError:
                reason = "ttl" if b.error is None else "retry"
            if b.cfg.debounce:
                b.busy = True                 # gathering the burst counts as busy
                await asyncio.sleep(b.cfg.debounce)
            b.wake.clear()
            try:
                await self._render(b, reason)
            except asyncio.CancelledError:
                raise
            except Exception:                  # never let one bad render end the block's task
                log.exception("render_crashed", block=b.name)
                b.busy = False

    # ------------------------------------------------------------ one render
    async def _render(self, b: Block, reason: str) -> None:
        b.busy = True
        try:
            await self._render_once(b, reason)
        finally:
            b.busy = False

    async def _render_once(self, b: Block, reason: str) -> None:
        r = Rendering(self._lookup)
        try:
            text = await r.render(b.template)
        except TemplateFailed as e:
            await self._failed(b, str(e), e.definitive, r)
            return
        data = text.encode()
        digest = hashlib.sha256(data).digest()
        b.keys = tuple(RenderedKey(ref, kid, ver) for ref, (kid, ver) in r.used.items())
        b.key_ids = frozenset(k.key_id for k in b.keys)
        b.uses_names = any("/" in k.ref for k in b.keys)
        now = await asyncio.to_thread(filewrite.current, b.path)
        intact = b.written is not None and now == b.written
        if digest == b.digest and intact:
            outcome = "unchanged"
        else:
            try:
                b.written = await asyncio.to_thread(filewrite.write_atomic, b.path, data, b.mode, b.uid, b.gid)
            except OSError as e:
                await self._failed(b, f"cannot write {b.path} ({e.strerror})", False, r)
                return
            outcome = "written"
        changed = b.digest is not None and digest != b.digest      # the reader had other content
        if outcome == "written" and digest != b.digest:
            b.delivered_at = _utc()
            self.metrics.delivered.labels(b.name).set(time.time())
        b.digest = digest
        b.rendered_at = _utc()
        b.renders += 1
        if b.error is not None:
            log.info("render_recovered", block=b.name)
        b.error, b.failures = None, 0
        self.metrics.failing.labels(b.name).set(0)
        self.metrics.renders.labels(b.name, outcome).inc()
        if outcome == "written":
            log.info("rendered", block=b.name, destination=str(b.path), reason=reason,
                     keys=[f"{k.key_id}@{k.version}" for k in b.keys], changed=changed)
        if changed and b.action is not None:
            out = await run_reload(b.action, b.name, str(b.path), b.cfg.reload_timeout)
            b.reload = out
            self.metrics.reloads.labels(b.name, out.action, out.outcome).inc()
            (log.info if out.outcome != "failed" else log.warning)(
                "render_reload", block=b.name, action=out.action, outcome=out.outcome, detail=out.detail)
        if outcome == "written" and self.on_change is not None:
            self.on_change()

    async def _failed(self, b: Block, why: str, definitive: bool, r: Rendering) -> None:
        b.error, b.failures = why, b.failures + 1
        self.metrics.failing.labels(b.name).set(1)
        outcome = "failed"
        if r.used:
            b.key_ids = b.key_ids | frozenset(kid for kid, _ in r.used.values())
        if definitive:
            # The key server said no (deleted, refused) or the template cannot render: a file rendered
            # earlier must not keep delivering a key this host may no longer hold.
            if await asyncio.to_thread(filewrite.remove, b.path):
                outcome = "removed"
                b.written, b.digest, b.keys = None, None, ()
        self.metrics.renders.labels(b.name, outcome).inc()
        log.warning("render_failed", block=b.name, destination=str(b.path), reason=why, definitive=definitive,
                    removed=outcome == "removed", failures=b.failures)

    # ------------------------------------------------------------ key material
    async def _inventory(self, suffix: str, query: str) -> tuple[int, dict]:
        try:
            resp = await self.upstream.request("GET", self.version, suffix, query=query)
        except UpstreamUnavailable as e:
            raise KeyUnavailable(f"the key server did not answer ({e})", definitive=False) from None
        return resp.status, parse_body(resp.body)

    async def _read(self, suffix: str, key_id: str, what: str, cacheable: bool) -> dict:
        fetch = lambda: self.upstream.request("GET", self.version, suffix)      # noqa: E731
        try:
            if cacheable:          # the same entry an app's read of this path uses (sidecar.local_api)
                res = await self.cache.get(f"{self.version} {suffix}?", key_id, fetch)
                status, raw = res.status, res.body
            else:
                resp = await fetch()
                status, raw = resp.status, resp.body
        except UpstreamUnavailable as e:
            raise KeyUnavailable(f"{what}: the key server did not answer ({e})", definitive=False) from None
        body = parse_body(raw)
        if status != 200:
            raise refusal(status, body, what)
        out = body.get("body")
        if not isinstance(out, dict):
            raise KeyUnavailable(f"{what}: the key server's answer has no body", definitive=False)
        return out

    async def _lookup(self, kind: str, ref: KeyRef) -> tuple[str, str, int | None]:
        info: KeyInfo = await self.resolver.info(ref)
        kid = info.key_id
        what = f"{kind}({ref.text})"
        if kind == "secret":
            if info.key_type not in (None, "SECRET"):
                raise KeyUnavailable(f"{what}: the key is a {info.key_type}, not a SECRET", definitive=True)
            out = await self._read(f"/secrets/{kid}", kid, what, True)
            value = out.get("secret")
            if not isinstance(value, str):
                raise KeyUnavailable(f"{what}: the key server returned no secret", definitive=False)
            return kid, value, info.version
        if kind == "public_key":
            out = await self._read(f"/asymmetric-keys/{kid}/publicKey", kid, what, True)
            try:
                pem = pem_public_key(str(out["encodedKey"]))
            except (KeyError, ValueError):
                raise KeyUnavailable(f"{what}: the key server returned no public key", definitive=False) from None
            return kid, pem, _version(out, info)
        out = await self._read(f"/symmetric-keys/{kid}/symmetric-key", kid, what, False)
        try:
            value = data_key_b64(out["symmetricKey"])
        except (KeyError, ValueError, TypeError):
            raise KeyUnavailable(f"{what}: the key server returned no key", definitive=False) from None
        return kid, value, _version(out, info)


def _version(out: dict, info: KeyInfo) -> int | None:
    v = out.get("keyVersion")
    return v if isinstance(v, int) else info.version

