"""A record of every local read (cache hits included), shipped to the key server's audit.

What is recorded: a read of a key's value an app made through this sidecar (a secret, a public
key, an exported key) and got: caller uid/pid/executable, key, version, served from the cache or
from upstream, and when. The key server appends them to its hash-chained audit as reads made
through this host (plane `sidecar`, docs/audit.md), so its audit answers "who read this secret"
including cache hits.

Cost on the fast path: the local API hands one tuple `(who, entry, source, time)` to `ReadLog.note`,
which keeps up to `detail_max` of them per interval and past that only counts them per caller, key
and source (a flood costs a dict update, not memory per read); everything else happens in a
background task once per `flush_interval`:
the tuples become records (one per read, or, past `detail_max` reads in one interval, one per
caller, key and source carrying the `count`: a flood is summarised, never dropped), the held
versions are handed to the acknowledgements (sidecar/acks.py), and the records leave in batches
(`batch_max`) over the host's mTLS connection.

While the key server cannot be reached, batches go to an on-disk spool (append-only, 0600,
bounded by `spool_max_records`) and are shipped, oldest first, once it answers again; a batch keeps
its id, so one the server took but did not confirm is not appended twice. Whatever does not fit is
counted (`skm_sidecar_reads_dropped_total`) and reported to the server, which appends an audit
record saying how many reads were lost and when: never silent.

The spool is sealed (AES-256-GCM) under a key derived (HKDF) from the host's private key, which
the sidecar already holds and must keep 0600: no second secret on disk, nothing readable or
forgeable from the spool directory alone, and a restart opens what the previous run wrote (the
issue asks for both "sealed under a key held only in memory" and "nothing lost across a restart";
this is what reconciles them). A spool written under another host key (the certificate was
renewed while the server was away) cannot be opened: its records are reported as lost, with that
cause. Records still in memory when the process is killed (at most one interval's) are lost; a
clean stop ships them or spools them.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import pkcs12

from server import logs
from server.errors import ConfigError
from sidecar.settings import ReadsConfig, SidecarConfig, read_secret_file
from sidecar.upstream import UpstreamUnavailable

log = logs.get("skm.sidecar.reads")

VERSION_HEADER = "X-SKM-Key-Version"
CACHE, UPSTREAM = "cache", "upstream"
_AAD = b"skm sidecar read spool v1|"
_SHIP_TIMEOUT_AT_STOP = 3.0
_by_read = itemgetter(0, 1, 2)


@dataclass(frozen=True, eq=False)
class Ref:
    """What was read (a cache Entry carries the same three attributes)."""
    key_id: str
    version: int | None
    tag: str                    # secret | publicKey | privateKey | symmetricKey


def tag_of(suffix: str) -> str | None:
    """The kind of value a client-API read returns, or None when the path is not a read of one."""
    if suffix.startswith("/secrets/"):
        return "secret"
    if suffix.endswith("/publicKey"):
        return "publicKey"
    if suffix.endswith("/privateKey"):
        return "privateKey"
    if suffix.endswith("/symmetric-key"):
        return "symmetricKey"
    return None


def version_of(headers, body: bytes) -> int | None:
    """The key version a read answered: the key server's header, else the body's `keyVersion`."""
    v = headers.get(VERSION_HEADER) if headers is not None else None
    if v is not None and v.isdigit():
        return int(v)
    try:
        kv = (json.loads(body).get("body") or {}).get("keyVersion")
    except (ValueError, AttributeError, TypeError):
        return None
    return kv if isinstance(kv, int) and not isinstance(kv, bool) else None


def spool_key(cfg: SidecarConfig) -> bytes:
    """The spool's AES-256 key: HKDF-SHA256 of the host private key (PKCS#8 DER)."""
    up = cfg.upstream
    try:
        if up.pkcs12:
            password = read_secret_file(up.pkcs12_password_file, "PKCS#12 password") if up.pkcs12_password_file else ""
            key, _, _ = pkcs12.load_key_and_certificates(Path(up.pkcs12).read_bytes(), password.encode() or None)
        else:
            key = serialization.load_pem_private_key(Path(up.key).read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the host key for the read spool: {type(e).__name__}") from None
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"skm sidecar read spool v1").derive(der)


@dataclass
class Batch:
    id: str
    reads: list[dict]
    dropped: dict | None = None

    def body(self) -> bytes:
        out: dict = {"batchId": self.id, "reads": self.reads}
        if self.dropped:
            out["dropped"] = self.dropped
        return json.dumps(out, separators=(",", ":")).encode()


class Spool:
    """Append-only file of sealed batches: `<records> <base64(nonce ‖ AES-GCM(batch JSON))>` per line."""

    def __init__(self, path: Path, key: bytes, max_records: int) -> None:
        self.path = path
        self.aead = AESGCM(key)
        self.max_records = max_records
        self.records = 0              # records in the file not yet shipped
        self.offset = 0               # bytes of the file already shipped (this run)
        # File work runs in worker threads; one cancelled at stop may still be running when stop spools.
        self._lock = threading.Lock()

    def scan(self) -> None:
        """At start: how many records a previous run left (their count is stored in clear)."""
        if not self.path.exists():
            return
        os.chmod(self.path, 0o600)
        with open(self.path, "rb") as f:
            for line in f:
                head = line.split(b" ", 1)[0]
                self.records += int(head) if head.isdigit() else 0

    def _seal(self, b: Batch) -> bytes:
        n = str(len(b.reads)).encode()
        nonce = os.urandom(12)
        ct = self.aead.encrypt(nonce, b.body(), _AAD + n)
        return n + b" " + base64.b64encode(nonce + ct) + b"\n"

    def append(self, batches: list[Batch]) -> int:
        """Write what fits; returns how many records did not fit (the caller counts them as dropped)."""
        with self._lock:
            return self._append(batches)

    def _append(self, batches: list[Batch]) -> int:
        lines, lost = [], 0
        for b in batches:
            room = self.max_records - self.records
            if len(b.reads) > room:
                lost += len(b.reads) - max(room, 0)
                if room <= 0:
                    continue
                b = Batch(b.id, b.reads[:room], b.dropped)      # the oldest are kept
            self.records += len(b.reads)
            lines.append(self._seal(b))
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, b"".join(lines))
                os.fsync(fd)
            finally:
                os.close(fd)
        return lost

    def next(self) -> tuple[Batch | None, int, int]:
        """(batch, records it holds, bytes the line took) at the shipping offset; (None, 0, 0) at the end
        (and then the file, all shipped, is removed).
        A line that cannot be opened comes back as batch None with its record count."""
        with self._lock:
            return self._next()

    def _next(self) -> tuple[Batch | None, int, int]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                line = f.readline()
        except FileNotFoundError:
            # Removed behind our back: whatever it still held is lost, and reported as such.
            lost, self.offset, self.records = self.records, 0, 0
            return None, lost, 0
        if not line:
            # All shipped: the file goes, under the same lock as the read (no append slips in between).
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.offset = self.records = 0
            return None, 0, 0
        head, _, blob = line.rstrip(b"\n").partition(b" ")
        n = int(head) if head.isdigit() else 0
        try:
            raw = base64.b64decode(blob, validate=True)
            data = json.loads(self.aead.decrypt(raw[:12], raw[12:], _AAD + head))
            b = Batch(data["batchId"], data["reads"], data.get("dropped"))
        except Exception:  # noqa: BLE001 - another host key, a torn write: reported as lost, never silent
            b = None
        return b, max(n, 1) if b is None else n, len(line)

    def shipped(self, n: int, size: int) -> None:
        with self._lock:
            self.offset += size
            self.records = max(0, self.records - n)



class ReadLog:
    def __init__(self, cfg: SidecarConfig, upstream, metrics, on_delivered: Callable[[list], None] | None = None,
                 key: bytes | None = None) -> None:
        self.cfg: ReadsConfig = cfg.reads
        self.version = cfg.upstream.api_version
        self.upstream = upstream
        self.metrics = metrics
        self.on_delivered = on_delivered              # acks: [(key_id, version, time), ...]
        # (who, ref, source, time): `note` appends here up to detail_max per interval (this list object is
        # never replaced: _take copies and clears it); past that, reads are only counted in `_over`.
        self.pending: list[tuple] = []
        self._cap = max(0, self.cfg.detail_max)
        self._over: dict[tuple, int] = {}             # (who, ref, source) -> reads past the cap
        self._over_span: list[float] = []             # [first, last] time of those reads
        self.spool = Spool(Path(self.cfg.spool_path(cfg)), key or spool_key(cfg), self.cfg.spool_max_records)
        self.dropped = 0                              # reads lost since the last report (buffer full)
        self.unreadable = 0                           # records in spool lines that could not be opened
        self._dropped_span: list[float] = []
        self._seq = 0
        self._prefix = os.urandom(8).hex()
        self._task: asyncio.Task | None = None
        # The batches the background tick is shipping: `_ship` removes each once the server confirmed it,
        # so a stop that cancels the tick mid-POST still holds what was not confirmed.
        self._inflight: list[Batch] = []
        self._wake = asyncio.Event()
        self.shipped = 0
        self.refused = 0
        self._exe: dict[int, str | None] = {}

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        await asyncio.to_thread(self.spool.scan)
        if self.spool.records:
            log.info("read_spool_found", records=self.spool.records, path=str(self.spool.path))
        self._task = asyncio.create_task(self._run(), name="sidecar-reads")
        self.metrics.pending.append(self._gauge)

    async def stop(self) -> None:
        """A clean stop: everything recorded is shipped, or else spooled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        batches = self._inflight + self._take()
        self._inflight = []
        try:
            await asyncio.wait_for(self._ship(batches), _SHIP_TIMEOUT_AT_STOP)
        except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - whatever was not confirmed is spooled
            log.info("read_records_spooled_at_stop", reason=type(e).__name__)
            await self._spool(batches)

    def wake(self) -> None:
        """Ship now (tests, and a server that just came back)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.flush_interval)
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything; the records stay queued
                log.exception("read_records_tick_failed")

    async def tick(self) -> None:
        self._inflight = batches = self._take()
        try:
            await self._ship(batches)
        except UpstreamUnavailable as e:
            log.info("read_records_spooled", reason=str(e)[:200], batches=len(batches))
            await self._spool(_moved(batches))

    # ------------------------------------------------------------ records
    def note(self, item: tuple) -> None:
        """One read (the hot path: called per cache hit)."""
        pending = self.pending
        if len(pending) < self._cap:
            pending.append(item)
            return
        key = item[:3]
        over = self._over
        over[key] = over.get(key, 0) + 1
        span = self._over_span
        if span:
            span[1] = item[3]
        else:
            span += [item[3], item[3]]

    def _take(self) -> list[Batch]:
        raw = self.pending.copy()
        self.pending.clear()
        over, span = self._over, self._over_span
        if over:
            self._over, self._over_span = {}, []
        records = self._records(raw, over, span) if raw or over else []
        n = max(1, self.cfg.batch_max)
        return [Batch(self._batch_id(), records[i:i + n]) for i in range(0, len(records), n)]

    def _batch_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq:016x}"

    def _records(self, raw: list[tuple], over: dict[tuple, int] | None = None,
                 span: list[float] | None = None) -> list[dict]:
        delivered: dict[str, tuple[int, float]] = {}
        out: list[dict] = []
        if not over and len(raw) <= self.cfg.detail_max:
            for who, ref, source, t in raw:
                out.append(self._record(who, ref, source, t))
                if ref.version is not None and ref.tag in ("secret", "publicKey"):
                    _newest(delivered, ref.key_id, ref.version, t)
        else:
            # A flood: one record per caller, value and source, with its count (counted in C, not per read here).
            times = [raw[0][3], raw[-1][3]] if raw else []
            times += span or []
            first, last = min(times), max(times)
            counts = Counter(map(_by_read, raw))
            for k, n in (over or {}).items():
                counts[k] += n
            for (who, ref, source), count in counts.items():
                rec = self._record(who, ref, source, first)
                if count > 1:
                    rec.update(count=count, lastReadAt=last)
                out.append(rec)
                if ref.version is not None and ref.tag in ("secret", "publicKey"):
                    _newest(delivered, ref.key_id, ref.version, last)
        if delivered and self.on_delivered is not None:
            self.on_delivered([(k, v, t) for k, (v, t) in delivered.items()])
        return out

    def _record(self, who, ref, source: str, t: float) -> dict:
        caller = getattr(who, "caller", who)
        pid = getattr(caller, "pid", None)
        exe = getattr(caller, "exe", None)
        return {"keyId": ref.key_id, "what": ref.tag, "version": ref.version, "uid": getattr(caller, "uid", None),
                "pid": pid, "exe": exe[:512] if exe else None, "source": source, "readAt": round(t, 6)}

    # ------------------------------------------------------------ shipping
    def _note_dropped(self, n: int) -> None:
        if n <= 0:
            return
        now = time.time()
        self.dropped += n
        if not self._dropped_span:
            self._dropped_span = [now, now]
        self._dropped_span[1] = now
        self.metrics.reads_dropped.inc(n)
        log.warning("read_records_dropped", count=n, spooled=self.spool.records,
                    hint="the key server has been unreachable long enough to fill the read spool")

    async def _spool(self, batches: list[Batch]) -> None:
        if not batches:
            return
        lost = await asyncio.to_thread(self.spool.append, batches)
        self.metrics.reads.labels("spooled").inc(sum(len(b.reads) for b in batches) - lost)
        self._note_dropped(lost)

    async def _ship(self, batches: list[Batch]) -> None:
        """Spooled batches first (oldest), then the new ones, then a loss report; stops at the first failure
        (raising UpstreamUnavailable) with what is left put back in order."""
        if self.spool.records or self.spool.offset:
            if batches:
                await self._spool(_moved(batches))   # keep the order: they go behind what waits on disk
            await self._drain_spool()
        while batches:
            await self._post(batches[0])
            batches.pop(0)
        if self.dropped or self.unreadable:
            await self._report_losses()

    async def _drain_spool(self) -> None:
        while True:
            b, n, size = await asyncio.to_thread(self.spool.next)
            if size == 0:                        # the end: Spool.next removed the shipped file
                if n:
                    self.unreadable += n
                    self.metrics.reads_dropped.inc(n)
                    log.warning("read_spool_missing", records=n)
                return
            if b is None:
                self.unreadable += n
                self.metrics.reads_dropped.inc(n)
                log.warning("read_spool_line_unreadable", records=n)
            else:
                await self._post(b)
            self.spool.shipped(n, size)

    async def _report_losses(self) -> None:
        for cause, count in (("unreadable_spool", self.unreadable), ("buffer_full", self.dropped)):
            if not count:
                continue
            span = self._dropped_span if cause == "buffer_full" else []
            d = {"count": count, "reason": cause, **({"since": span[0], "until": span[1]} if span else {})}
            await self._post(Batch(self._batch_id(), [], d))
            if cause == "buffer_full":
                self.dropped, self._dropped_span = 0, []
            else:
                self.unreadable = 0

    async def _post(self, b: Batch) -> None:
        resp = await self.upstream.request("POST", self.version, "/sidecar/reads", body=b.body(),
                                           content_type="application/json")
        if resp.server_error:
            raise UpstreamUnavailable(f"the key server answered {resp.status}")
        n = len(b.reads)
        if resp.status >= 400:
            # Refused as a whole (e.g. this host no longer passes any key store's checks): retrying cannot
            # help. The server's audit holds the refused request; here it is counted and logged.
            self.refused += n
            self.metrics.reads.labels("refused").inc(n)
            log.warning("read_records_refused", status=resp.status, records=n, reason=_message(resp.body))
            return
        try:
            out = json.loads(resp.body).get("body") or {}
        except ValueError:
            out = {}
        refused = len(out.get("refused") or ())
        if refused:
            self.refused += refused
            self.metrics.reads.labels("refused").inc(refused)
            log.warning("read_records_refused", records=refused, reason=(out["refused"][0] or {}).get("reason"))
        self.shipped += n - refused
        self.metrics.reads.labels("shipped").inc(n - refused)

    def _gauge(self) -> None:
        self.metrics.reads_spooled.set(self.spool.records)

    def status(self) -> dict:
        return {"pending": len(self.pending) + sum(self._over.values()), "spooled": self.spool.records,
                "shipped": self.shipped,
                "refused": self.refused, "droppedUnreported": self.dropped + self.unreadable}


def _moved(batches: list[Batch]) -> list[Batch]:
    """Take every batch out of `batches` (the in-flight list) before they are spooled: a stop that
    cancels the spooling thread's waiter must not spool them a second time."""
    out = list(batches)
    batches.clear()
    return out


def _newest(d: dict, key_id: str, version: int, t: float) -> None:
    held = d.get(key_id)
    if held is None or version > held[0] or (version == held[0] and t > held[1]):
        d[key_id] = (version, t)


def _message(body: bytes) -> str:
    try:
        h = json.loads(body)["header"]
        return f"{h.get('resultMessage')}: {h.get('resultDetail') or ''}"[:300]
    except (ValueError, KeyError, TypeError):
        return ""
