"""Acknowledgements: tell the key server which version of each key this host holds (the roll-out).

Sources of holdings plug in as callables `holdings() -> list[(key_id, version, delivered_at, reload_ok)]`
(`delivered_at`: seconds since the epoch; `reload_ok`: None when no reload action ran). The local
API's reads are one source (`Delivered`, fed by sidecar/reads.py: the newest version delivered to an
app, per key); the template renderer (sidecar/render.py) adds its own with `Acks.add_source`, and
calls `Acks.poke()` after it rendered and reloaded. When several sources hold one key, the host
reports the OLDEST version among them: that is the one still in use here, which a version disable
must wait for.

The reporter sends the whole set, batched (`MAX_BATCH` per request), soon after a change (`poke`)
and otherwise every `ttl / 3` seconds as a heartbeat (the first one `ttl / 3` after start), with
`ttl`: the key server marks this host stale when it has heard nothing for longer. A report that
fits one request is marked `complete`, so the server drops this host's rows for keys it no longer
holds: a sidecar restarted with an empty cache stops counting as a holder of what its previous run
delivered (and stops blocking a version disable) at its first report, even if no app reads again. A report that fails is simply sent
again at the next turn (holdings are state, not events: only the latest matters).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Callable, Iterable

from server import logs
from sidecar.upstream import UpstreamUnavailable

log = logs.get("skm.sidecar.acks")

Holding = tuple[str, int, float | None, bool | None]      # key_id, version, delivered_at, reload_ok
Source = Callable[[], Iterable[Holding]]
MAX_BATCH = 1000
MAX_KEYS = 10_000              # keys remembered per source (a bound, not a limit apps meet)
MIN_GAP = 0.2                  # seconds between two reports when changes come quickly


class Delivered:
    """Holdings from local reads: per key, the newest version delivered to an app and when."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, float]] = {}
        self.changed = False

    def note(self, items: list[tuple[str, int, float]]) -> None:
        for key_id, version, t in items:
            held = self._held.get(key_id)
            if held is None or version > held[0] or (version == held[0] and t > held[1]):
                if held is None or version != held[0]:
                    self.changed = True
                if held is None and len(self._held) >= MAX_KEYS:
                    continue
                self._held[key_id] = (version, t)

    def forget(self, key_id: str) -> None:
        self._held.pop(key_id, None)

    def holdings(self) -> list[Holding]:
        return [(k, v, t, None) for k, (v, t) in self._held.items()]


def merge(sources: Iterable[Source]) -> dict[str, Holding]:
    """One holding per key: the oldest version any source still holds (see the module doc)."""
    out: dict[str, Holding] = {}
    for src in sources:
        for key_id, version, delivered, reload_ok in src():
            cur = out.get(key_id)
            if cur is None or version < cur[1]:
                out[key_id] = (key_id, version, delivered, reload_ok)
            elif version == cur[1]:
                ok = cur[3] if reload_ok is None else (reload_ok if cur[3] is None else cur[3] and reload_ok)
                times = [d for d in (cur[2], delivered) if d is not None]
                last = max(times) if times else None
                out[key_id] = (key_id, version, last, ok)
    return out


class Acks:
    def __init__(self, upstream, version: str, ttl: float, metrics, delivered: Delivered | None = None) -> None:
        self.upstream = upstream
        self.version = version
        self.ttl = max(2, int(ttl))
        self.metrics = metrics
        self.delivered = delivered or Delivered()
        self.sources: list[Source] = [self.delivered.holdings]
        self._poked = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.sent = 0                 # reports the key server accepted
        self._empty_sent = False      # the empty complete set was accepted (it need not be repeated)
        self.last_error: str | None = None

    def add_source(self, source: Source) -> None:
        """Another holder of key versions on this host (the template renderer)."""
        self.sources.append(source)
        self.poke()

    def poke(self) -> None:
        """Something changed: report soon."""
        self._poked.set()

    def on_delivered(self, items: list[tuple[str, int, float]]) -> None:
        self.delivered.note(items)
        if self.delivered.changed:
            self.delivered.changed = False
            self.poke()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sidecar-acks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _run(self) -> None:
        heartbeat = self.ttl / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), heartbeat)
            self._poked.clear()
            try:
                await self.report()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the next turn sends the whole set again
                self.last_error = type(e).__name__
                log.exception("acks_failed")
            await asyncio.sleep(MIN_GAP)

    async def report(self) -> None:
        held = list(merge(self.sources).values())
        if not held:
            # Nothing held: one complete (empty) report clears what the server still has for this host;
            # repeating it each heartbeat would say nothing new.
            if not self._empty_sent:
                self._empty_sent = await self._post([], complete=True)
            return
        self._empty_sent = False
        complete = len(held) <= MAX_BATCH
        for i in range(0, len(held), MAX_BATCH):
            await self._post(held[i:i + MAX_BATCH], complete=complete)

    async def _post(self, items: list[Holding], *, complete: bool = False) -> bool:
        """Send one report; True when the key server accepted it."""
        body = {"ttl": self.ttl, "complete": complete, "holdings": [
            {"keyId": k, "version": v, "deliveredAt": None if t is None else round(t, 6), "reloadOk": ok}
            for k, v, t, ok in items]}
        try:
            resp = await self.upstream.request("POST", self.version, "/sidecar/acks",
                                               body=json.dumps(body, separators=(",", ":")).encode(),
                                               content_type="application/json")
        except UpstreamUnavailable as e:
            self.last_error = str(e)[:200]
            self.metrics.acks.labels("unavailable").inc()
            return False
        if resp.status >= 300:
            self.last_error = f"HTTP {resp.status}"
            self.metrics.acks.labels("refused").inc()
            log.warning("acks_refused", status=resp.status)
            return False
        self.last_error = None
        self.sent += 1
        self.metrics.acks.labels("sent").inc()
        try:
            refused = (json.loads(resp.body).get("body") or {}).get("refused") or []
        except ValueError:
            refused = []
        for r in refused:
            # A key that no longer exists (or another project's): stop reporting it.
            idx = r.get("index") if isinstance(r, dict) else None
            if isinstance(idx, int) and 0 <= idx < len(items) and "Invalid Key Id" in str(r.get("reason")):
                self.delivered.forget(items[idx][0])
        return True

    def status(self) -> dict:
        return {"ttlSeconds": self.ttl, "keys": len(merge(self.sources)), "reportsSent": self.sent,
                "lastError": self.last_error}
