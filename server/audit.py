"""The audit log: every data-plane and management-plane request and decision, hash-chained.

Each record carries `prev_hash` (the previous record's hash) and `hash` =
SHA-256 of its own canonical form including `prev_hash` and `seq`, so editing,
deleting or reordering a record breaks the chain at that record. Values are
never recorded: a request body appears only as an HMAC under the audit key (a
random key of its own, sealed by the barrier in `audit_head`).

Appends are group-committed: a request queues its record and waits; one writer
task per process takes everything queued (up to `batch_max`) and writes it in
ONE transaction: the single `audit_head` row is updated first (a row lock on
PostgreSQL, the one writer on SQLite), which reserves the batch's sequence
numbers and yields the previous hash; the records are chained in queue order,
inserted together, and the head's hash is set once, all in that transaction.
Only then are the waiting requests released, so a response never leaves before
its record is durable. The chain stays linear across replicas (the head row
lock) and within a process (one writer).

A write failure fails every request of its batch (503) unless `fail_closed` is off.

The body HMAC covers a body the request's handler read; the middleware itself never
reads from the connection. A request refused before its body was read (no operator
token, too large, too slow, an unknown API version) is recorded with
`bodyHmac: "not read"`: waiting for that body here would let a client that declared
10 GiB and sent 1 KiB hold the request (and its audit record) open.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac as _hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server import logs, timeutil
from server.barrier.barrier import sealed_aad
from server.errors import ApprovalRequired, InvalidRequest, SKMError, Unavailable
from server.runtime import CLIENT_CTX, ERROR, KEY, OPERATOR, _request_key, runtime
from server.settings import AuditSettings   # [audit] in the server config
from server.storage.base import Executor, Storage

log = logs.get("skm.audit")

GENESIS = "0" * 64
AUDIT_ACTION = _request_key("skm_audit_action")   # a handler may name what it did, e.g. "key.reveal"
AUDIT_DETAIL = _request_key("skm_audit_detail")   # extra identifiers (never values) for the record
SKIP_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
SKIP_PREFIXES = ("/console/static/",)                # the console's CSS/JS: no decision to record
# Requests whose body is a password: no body HMAC (an HMAC of a low-entropy secret under a key the
# server holds is a password hash an insider could test guesses against).
NO_BODY_HMAC = frozenset({("POST", "/api/v1/login"), ("POST", "/console/login")})
BODY_NOT_READ = "not read"      # bodyHmac of a body nobody read (the request was refused before that)
# The fields a record's hash covers, in this order.
FIELDS = ("seq", "at", "plane", "actor", "actor_kind", "ip", "fingerprint", "mac", "method", "route", "action",
          "keystore_id", "key_id", "status", "result", "reason", "detail", "prev_hash")
_HMAC_AAD = sealed_aad("audit_head", "hmac_key_sealed", 1)


def record_hash(rec: dict) -> str:
    """SHA-256 over the canonical JSON of the hashed fields (ints stay ints, None stays null)."""
    canon = [rec.get(f) if f not in ("keystore_id", "status", "seq") or rec.get(f) is None else int(rec[f])
             for f in FIELDS]
    return hashlib.sha256(json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def to_api(r: dict) -> dict:
    try:
        detail = json.loads(r["detail"] or "{}")
    except ValueError:
        detail = {"unreadable": True}
    return {"seq": int(r["seq"]), "time": r["at"], "plane": r["plane"], "actor": r["actor"],
            "actorKind": r["actor_kind"], "ip": r["ip"], "fingerprint": r["fingerprint"], "mac": r["mac"],
            "method": r["method"], "route": r["route"], "action": r["action"], "keyStoreId": r["keystore_id"],
            "keyId": r["key_id"], "status": r["status"], "result": r["result"], "reason": r["reason"],
            "detail": detail, "prevHash": r["prev_hash"], "hash": r["hash"]}


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    broken_seq: int | None = None
    reason: str | None = None

    def to_api(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "headSeq": self.head_seq, "brokenSeq": self.broken_seq,
                "reason": self.reason}


async def verify_chain(db: Storage | Executor, page: int = 1000) -> VerifyResult:
    """Walk the chain from the first record to the head; report the first broken link.

    Needs no key: anyone holding the database (or a copy) can check it. The head is
    read first so records appended during the walk are not mistaken for damage.
    """
    head = await db.fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
    if head is None:
        return VerifyResult(False, 0, 0, 0, "the audit head row is missing")
    head_seq, expected, prev, n = int(head["seq"]), 1, GENESIS, 0
    while expected <= head_seq:
        rows = await db.fetchall("SELECT * FROM audit_log WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
                                 expected, head_seq, page)
        if not rows:
            break
        for r in rows:
            seq = int(r["seq"])
            if seq != expected:
                return VerifyResult(False, n, head_seq, expected,
                                    f"record {expected} is missing (deleted); the chain jumps to {seq}")
            if r["prev_hash"] != prev:
                return VerifyResult(False, n, head_seq, seq,
                                    f"record {seq} does not chain to record {seq - 1} (a record was replaced)")
            if record_hash(r) != r["hash"]:
                return VerifyResult(False, n, head_seq, seq, f"record {seq} was changed: its contents do not "
                                    "match its hash")
            prev, expected, n = r["hash"], expected + 1, n + 1
    if expected <= head_seq:
        return VerifyResult(False, n, head_seq, expected,
                            f"record {expected} is missing (deleted); the log ends before the head ({head_seq})")
    if prev != head["hash"]:
        return VerifyResult(False, n, head_seq, head_seq, f"the last record ({head_seq}) does not match the head")
    return VerifyResult(True, n, head_seq)


class Audit:
    def __init__(self, storage: Storage, barrier, settings: AuditSettings | None = None) -> None:
        self.db = storage
        self.barrier = barrier
        self.settings = settings or AuditSettings()
        self._key: bytes | None = None
        self._queue: list[tuple[dict, asyncio.Future]] = []   # records waiting for the writer, in order
        self._writer: asyncio.Task | None = None

    # ----------------------------------------------------------------- HMACs
    async def hmac_key(self) -> bytes | None:
        if self._key is not None:
            return self._key
        if self.barrier.sealed:
            return None
        row = await self.db.fetchone("SELECT hmac_key_sealed FROM audit_head WHERE id = 1")
        if row is not None and row["hmac_key_sealed"] is None:
            blob = self.barrier.seal(os.urandom(32), _HMAC_AAD)
            # Compare-and-set: two replicas starting together keep one key.
            await self.db.execute("UPDATE audit_head SET hmac_key_sealed = ? WHERE id = 1 "
                                  "AND hmac_key_sealed IS NULL", blob)
            row = await self.db.fetchone("SELECT hmac_key_sealed FROM audit_head WHERE id = 1")
        if row is None or row["hmac_key_sealed"] is None:
            return None
        self._key = self.barrier.open(bytes(row["hmac_key_sealed"]), _HMAC_AAD)
        return self._key

    async def hmac(self, value: bytes | str) -> str | None:
        """`hmac-sha256:<hex>` of a value, or None while the barrier is sealed."""
        key = await self.hmac_key()
        if key is None:
            return None
        data = value.encode() if isinstance(value, str) else value
        return "hmac-sha256:" + _hmac.new(key, data, hashlib.sha256).hexdigest()

    # ---------------------------------------------------------------- writing
    async def append(self, rec: dict[str, Any]) -> int:
        """Append one record; returns its sequence number once the record is committed.

        Raises what the write raised when its batch failed (the whole batch rolls back)."""
        row = {f: rec.get(f) for f in FIELDS if f not in ("seq", "prev_hash")}
        row["at"] = row.get("at") or timeutil.now_db()
        row["detail"] = json.dumps(rec.get("detail") or {}, separators=(",", ":"), sort_keys=True)
        for f in ("actor", "ip", "fingerprint", "mac", "route", "action", "key_id", "result"):
            if isinstance(row.get(f), str):
                row[f] = row[f][:256]
        if isinstance(row.get("reason"), str):
            row["reason"] = row["reason"][:1000]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.append((row, fut))
        w = self._writer
        if w is None or w.done() or w.get_loop() is not loop:
            self._writer = loop.create_task(self._drain(), name="audit-writer")
        return await fut

    async def _drain(self) -> None:
        """The one writer: commit what is queued, a batch per transaction, until the queue is empty."""
        me = asyncio.current_task()
        batch: list[tuple[dict, asyncio.Future]] = []
        try:
            while self._queue:
                n = min(max(1, int(self.settings.batch_max)), 1000)    # bound the statement's parameters
                batch, self._queue[:n] = self._queue[:n], []
                try:
                    await self._write([row for row, _ in batch])
                except Exception as e:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    for row, fut in batch:
                        if not fut.done():
                            fut.set_result(row["seq"])
                batch = []
        finally:
            # Cancelled (the loop is stopping): nothing may wait forever, and nothing counts as written.
            left = batch
            if self._writer is me:
                left, self._queue = left + self._queue, []
                self._writer = None
            for _, fut in left:
                if not fut.done():
                    fut.set_exception(Unavailable("the audit writer stopped"))

    async def close(self) -> None:
        """Let the writer commit what is queued (at shutdown, after the listeners have stopped)."""
        w = self._writer
        if w is not None and not w.done() and w.get_loop() is asyncio.get_running_loop():
            try:
                await asyncio.wait_for(asyncio.shield(w), 10)
            except (asyncio.TimeoutError, Exception):
                w.cancel()

    async def _write(self, rows: list[dict]) -> None:
        """One transaction: reserve len(rows) sequence numbers, chain the rows in order, insert, move the head."""
        n = len(rows)
        async with self.db.transaction() as tx:
            head = await tx.fetchone("UPDATE audit_head SET seq = seq + ? WHERE id = 1 RETURNING seq, hash", n)
            seq, prev = int(head["seq"]) - n, head["hash"]
            values: list[Any] = []
            for row in rows:
                seq += 1
                row["seq"], row["prev_hash"] = seq, prev
                prev = record_hash(row)
                values += [row[f] for f in FIELDS]
                values.append(prev)
            one = f"({', '.join('?' * (len(FIELDS) + 1))})"
            await tx.execute(f"INSERT INTO audit_log ({', '.join(FIELDS)}, hash) VALUES {', '.join([one] * n)}",
                             *values)
            await tx.execute("UPDATE audit_head SET hash = ? WHERE id = 1", prev)

    async def event(self, action: str, *, actor: str, actor_kind: str = "system", keystore_id: int | None = None,
                    key_id: str | None = None, result: str = "ok", reason: str | None = None,
                    detail: dict | None = None) -> int | None:
        """A decision taken outside one request (approval applied, expired...)."""
        if not self.settings.enabled:
            return None
        return await self.append({"plane": "system", "actor": actor, "actor_kind": actor_kind, "action": action,
                                  "keystore_id": keystore_id, "key_id": key_id, "result": result,
                                  "reason": reason, "detail": detail})

    # ---------------------------------------------------------------- reading
    async def query(self, *, since: str | None = None, until: str | None = None, actor: str | None = None,
                    plane: str | None = None, key_id: str | None = None, keystore_id: int | None = None,
                    result: str | None = None, action: str | None = None, after_seq: int = 0,
                    limit: int = 100) -> list[dict]:
        where, args = ["seq > ?"], [after_seq]
        for col, val in (("actor", actor), ("plane", plane), ("key_id", key_id), ("keystore_id", keystore_id),
                         ("result", result), ("action", action)):
            if val is not None:
                where.append(f"{col} = ?"), args.append(val)
        if since:
            where.append("at >= ?"), args.append(since)
        if until:
            where.append("at < ?"), args.append(until)
        rows = await self.db.fetchall(f"SELECT * FROM audit_log WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                                      *args, limit)
        return [to_api(r) for r in rows]

    async def verify(self) -> VerifyResult:
        return await verify_chain(self.db)

    # ------------------------------------------------------------- middleware
    def middleware(self, plane: str):
        @web.middleware
        async def audit(request: web.Request, handler):
            if not self.settings.enabled or _skipped(request.path):
                return await handler(request)
            der = _peer_der(request)          # the transport is gone once the peer leaves
            try:
                resp = await handler(request)
            except asyncio.CancelledError:
                raise
            except BaseException:
                await self._record_quietly(request, plane, der, 500)
                raise
            try:
                await self._record(request, plane, der, resp.status)
            except Exception as e:
                _log_write_failure(e, plane, request)
                if self.settings.fail_closed and not resp.prepared:
                    from server.api.envelope import error_response
                    return error_response(Unavailable("the audit log cannot be written, so the request is "
                                                      "refused (audit is fail-closed)"))
            return resp
        return audit

    async def _record_quietly(self, request: web.Request, plane: str, der: bytes | None, status: int) -> None:
        try:
            await self._record(request, plane, der, status)
        except Exception as e:
            _log_write_failure(e, plane, request)

    async def _record(self, request: web.Request, plane: str, der: bytes | None, status: int) -> None:
        rec = await self.describe(request, plane, der, status)
        await self.append(rec)

    async def describe(self, request: web.Request, plane: str, der: bytes | None, status: int) -> dict:
        err: SKMError | None = request.get(ERROR)
        resource = request.match_info.route.resource if request.match_info.route is not None else None
        route = resource.canonical if resource is not None else None
        detail: dict[str, Any] = dict(request.get(AUDIT_DETAIL) or {})
        rid = request.headers.get("X-Request-Id")
        if rid and len(rid) <= 64:
            detail["requestId"] = rid
        if request.body_exists and (request.method, request.path.rstrip("/")) not in NO_BODY_HMAC:
            body = await _body_read_by_handler(request)
            if body is None:
                detail["bodyHmac"] = BODY_NOT_READ
            elif body:
                mac = await self.hmac(body)
                detail["bodyHmac"] = mac if mac is not None else "unavailable (sealed)"
        rec: dict[str, Any] = {"plane": plane, "method": request.method, "route": route, "status": status,
                               "ip": request.remote or None}
        ctx = request.get(CLIENT_CTX)
        op = request.get(OPERATOR)
        if op is not None:
            rec.update(actor=op.name, actor_kind="operator")
        elif ctx is not None:
            rec.update(actor=ctx.caller, actor_kind="client", ip=ctx.peer_ip or None, fingerprint=ctx.fingerprint,
                       mac=(ctx.mac_header or None) and ctx.mac_header[:64])
        else:
            rec.update(actor="anonymous", actor_kind="anonymous",
                       fingerprint=hashlib.sha256(der).hexdigest() if der else None)
            rt = runtime(request)
            if rt.access is not None:
                rec["ip"] = rt.access.client_ip(request) or None
            if plane == "data":
                m = request.headers.get("X-TOAST-CLIENT-MAC-ADDR")
                rec["mac"] = m[:64] if m else None
        key = request.get(KEY)
        key_id = key.id if key is not None else (request.match_info.get("key_id") or request.match_info.get("keyid"))
        rec["key_id"] = key_id[:64] if key_id else None
        ks = request.match_info.get("keystore_id")
        rec["keystore_id"] = key.keystore_id if key is not None else (int(ks) if ks and ks.isdigit() else None)
        rec["action"] = request.get(AUDIT_ACTION) or f"{request.method} {route or '<no route>'}"
        if isinstance(err, ApprovalRequired):
            rec["result"] = "approval_required"
            detail["changeRequestId"] = err.request_id
        elif status < 400:
            rec["result"] = "ok"
        else:
            rec["result"] = "denied" if status in (401, 403, 429) else ("error" if status >= 500 else "refused")
            if err is not None:
                rec["reason"] = err.message + (f": {err.detail}" if err.detail else "")
            else:
                rec["reason"] = f"HTTP {status}"
        rec["detail"] = detail
        return rec


async def _body_read_by_handler(request: web.Request) -> bytes | None:
    """The body the handler read, or None when it was not read to its end.

    `at_eof()` (all of the body received and consumed) says the handler read it; aiohttp keeps
    what `read()`/`json()`/`post()` read, so `read()` returns it without touching the connection.
    Otherwise the body was refused unread (or only partly read): reading it now would wait on the
    client, so it is left alone."""
    if not request.content.at_eof():
        return None
    try:
        return await request.read()
    except Exception:      # nothing to fingerprint
        return None


def _log_write_failure(e: Exception, plane: str, request: web.Request) -> None:
    if isinstance(e, SKMError):
        # Expected (e.g. the database is unreachable): the reason, no stack trace.
        log.warning("audit_write_failed", plane=plane, path=request.rel_url.path, result=e.message,
                    error_type=type(e).__name__)
    else:
        log.exception("audit_write_failed", plane=plane, path=request.rel_url.path)


def _skipped(path: str) -> bool:
    return path in SKIP_PATHS or path.startswith(SKIP_PREFIXES)


def _peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_obj is None:
        return None
    try:
        return ssl_obj.getpeercert(binary_form=True) or None
    except ValueError:
        return None


def parse_time(value: str | None, what: str) -> str | None:
    """API/CLI time (ISO 8601, UTC when no zone) -> the database's fixed-width text."""
    if not value:
        return None
    import datetime as dt
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{what} must be an ISO 8601 time, e.g. 2025-01-31T09:00:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return timeutil.to_db(t)


def install(rt) -> None:
    rt.audit = Audit(rt.storage, rt.barrier, AuditSettings.from_config(rt.config))
    rt.extra.setdefault("data_middlewares", []).append(rt.audit.middleware("data"))
    rt.extra.setdefault("mgmt_middlewares", []).append(rt.audit.middleware("mgmt"))

    async def stop(rt_) -> None:
        if rt_.audit is not None:
            await rt_.audit.close()

    rt.extra.setdefault("on_stop", []).append(stop)
