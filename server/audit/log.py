"""The audit log: every data-plane and management-plane request and decision, chained.

Record shape, links and checkpoints: docs/audit.md and `server/audit/record.py`. Values are never
recorded: a request body appears only as an HMAC under the audit key (a random key of its own,
sealed by the barrier in `audit_head`).

Appends are group-committed: a request queues its record and waits; one writer task per process
takes everything queued (up to `batch_max`) and writes it in ONE transaction: the single
`audit_head` row is updated first (a row lock on PostgreSQL, the one writer on SQLite), which
reserves the batch's sequence numbers and yields the previous digest; the records are chained in
queue order, tagged, inserted together, and the head's digest is set once, all in that transaction.
Only then are the waiting requests released, so a response never leaves before its record is
durable. A write failure fails every request of its batch (503) unless `fail_closed` is off.

With several workers (or replicas) every process writes its own batches, and the chain stays one
line because each write moves the one `audit_head` row in the same transaction. On SQLite the
writers take turns through the storage's writer lock (server/storage/sqlite.py), which wakes the
next one as soon as the other commits, and the whole transaction runs on the event loop's thread
(a few hundred microseconds of SQLite work; a thread of its own cost more in GIL hand-offs). On
PostgreSQL a writer chains its batch after the head it last saw and writes rows and head in one
statement that writes nothing, and answers the head it found, if the head has moved
(`_write_after_known_head`), so no row lock is held across a round trip. The workers of one host
chain after their shared tip (server/audit/tip.py), the end of the last batch any of them sent, and
PostgreSQL's row lock holds each statement until the one before it commits.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac as _hmac
import os
import time
from typing import Any

from server import logs, timeutil
from server.audit.chain import VerifyResult, verify_chain
from server.audit.record import (FIELDS, GENESIS, INT_FIELDS, ROW_FIELDS, canon_body, chained_digest, link_key,
                                 make_row, tagger, to_api)
from server.audit.tip import SharedTip
from server.barrier.barrier import sealed_aad
from server.errors import InvalidRequest, Unavailable
from server.settings import AuditSettings   # [audit] in the server config
from server.storage.base import Storage

log = logs.get("skm.audit")

COLUMNS = FIELDS + ("hash", "tag")
_HMAC_AAD = sealed_aad("audit_head", "hmac_key_sealed", 1)
HELD_MAX = 10_000          # records held in memory while the barrier is sealed


async def read_link_key(db, barrier) -> bytes | None:
    """The link key of a database's chain, read only (None when it has none yet or the barrier is sealed)."""
    if barrier.sealed:
        return None
    row = await db.fetchone("SELECT hmac_key_sealed FROM audit_head WHERE id = 1")
    if row is None or row["hmac_key_sealed"] is None:
        return None
    return link_key(barrier.open(bytes(row["hmac_key_sealed"]), _HMAC_AAD))


_RESERVE = "UPDATE audit_head SET seq = seq + ? WHERE id = 1 RETURNING seq, hash"
_SET_HEAD = "UPDATE audit_head SET hash = ? WHERE id = 1"
_INSERT_SQLITE = f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
OPTIMISTIC_TRIES = 8               # PostgreSQL: writes after the last head seen before locking the head instead
RESENDS = 2                        # ... plus the same statement again while the batch before it is on its way
# One statement: move the head if it is still (seq, hash) and insert the batch; either both happen or
# neither. It answers how many rows it wrote and the head as it found it, which is where to chain again
# when that was 0. A row's fields travel as the canonical form's body the digest was computed over
# (`canon_body`, one JSON text) beside its prev_hash, hash and tag; PostgreSQL takes the columns out of
# it (parsed once per row: MATERIALIZED, or each column would parse it again), so what is stored is read
# from the very bytes that were hashed, and asyncpg encodes four arrays instead of twenty (~7 µs less of
# our CPU per record, the same of PostgreSQL's). `make_row` leaves no NUL in a text field, which jsonb
# could not hold. (The INTEGER columns take the BIGINTs by assignment.)
#
# Two forms. A writer alone, or a replica (nothing tells it what the others have sent), tests the head
# in the WHERE: PostgreSQL tests it against the head as it was when the statement began, so a batch
# that cannot land is refused at once. The workers of one host chain after their shared tip
# (server/audit/tip.py), often after a batch another worker has sent and PostgreSQL has not committed
# yet: their form takes the head's row whatever it holds and tests it in the SET, so it waits for that
# commit and then tests the head as it is now (refused, it writes the row back unchanged). Waiting
# without a tip only delays the refusal: two replicas alternated with the waiting form served ~9 % fewer
# secret reads.
_BODY_COLUMNS = ", ".join(f"CAST(j->>{i} AS BIGINT)" if f in INT_FIELDS else f"j->>{i}"
                          for i, f in enumerate(ROW_FIELDS))
_ROWS_AND_INSERT = (
    "r AS MATERIALIZED (SELECT o, CAST('[' || b || ']' AS jsonb) AS j, p, d, t FROM unnest(CAST(? AS TEXT[]), "
    "CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS TEXT[])) WITH ORDINALITY AS u(b, p, d, t, o)), "
    f"ins AS (INSERT INTO audit_log ({', '.join(COLUMNS)}) SELECT CAST(? AS BIGINT) + o, {_BODY_COLUMNS}, p, d, t "
    "FROM r WHERE EXISTS (SELECT 1 FROM h{moved}) RETURNING 1) ")
_WRITE_AFTER_HEAD = (
    "WITH h AS (UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1 AND seq = ? AND hash = ? RETURNING id), "
    + _ROWS_AND_INSERT.format(moved="")
    + "SELECT (SELECT count(*) FROM ins) AS written, seq, hash FROM audit_head WHERE id = 1")
_WRITE_AFTER_TIP = (
    "WITH h AS (UPDATE audit_head SET seq = CASE WHEN seq = ? AND hash = ? THEN ? ELSE seq END, "
    "hash = CASE WHEN seq = ? AND hash = ? THEN ? ELSE hash END WHERE id = 1 RETURNING seq, hash), "
    + _ROWS_AND_INSERT.format(moved=" WHERE h.seq = ? AND h.hash = ?")
    + "SELECT (SELECT count(*) FROM ins) AS written, seq, hash FROM h")


def _insert_sql(n: int) -> str:
    """A multi-row INSERT of `n` records (PostgreSQL, the locked path)."""
    row = f"({', '.join('?' * len(COLUMNS))})"
    return f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES {', '.join([row] * n)}"


def _digests(rows: list[dict], seq: int, prev: str, bodies: list[bytes]) -> list[str]:
    """Number `rows` after record `seq` (digest `prev`) and link them, setting each row's `seq` and
    `prev_hash`: their digests. `bodies`: the rows' `canon_body`, encoded once per batch before any
    lock is taken."""
    digests: list[str] = []
    for row, body in zip(rows, bodies):
        seq += 1
        row["seq"], row["prev_hash"] = seq, prev
        prev = chained_digest(seq, body, prev)
        digests.append(prev)
    return digests


def _link(rows: list[dict], seq: int, prev: str, key: bytes, bodies: list[bytes]) -> tuple[list[str], list[str]]:
    """`_digests`, and the digests' tags."""
    digests = _digests(rows, seq, prev, bodies)
    tag_of = tagger(key)
    return digests, [tag_of(d) for d in digests]


def _chain(rows: list[dict], head: dict, key: bytes, bodies: list[bytes]) -> tuple[int, list[list[Any]], str]:
    """Number, link and tag `rows` after the head just reserved (the head's seq already moved past them):
    (the last record's seq, the rows' column values, the last record's digest)."""
    seq = int(head["seq"])
    digests, tags = _link(rows, seq - len(rows), head["hash"], key, bodies)
    values = [[row[f] for f in FIELDS] + [d, t] for row, d, t in zip(rows, digests, tags)]
    return seq, values, digests[-1] if digests else head["hash"]


def _append_sync(rows: list[dict], key: bytes, bodies: list[bytes], con) -> int:
    """`Audit._write` on SQLite, inside its transaction (blocking)."""
    head = con.execute(_RESERVE, (len(rows),)).fetchall()[0]
    seq, values, last = _chain(rows, head, key, bodies)
    con.executemany(_INSERT_SQLITE, values)
    con.execute(_SET_HEAD, (last,))
    return seq


class _Batch:
    """One batch on its way to PostgreSQL (`Audit._write_after_known_head`): the statement's arguments,
    made when a connection is in hand, just before the statement leaves (`fetchone_at_send`), so the
    host's tip is claimed at the last moment and batches reach PostgreSQL in the order they were chained
    after one another. Made once per head: a resend sends the same arguments."""

    def __init__(self, rows: list[dict], bodies: list[bytes], key: bytes, tip: SharedTip | None,
                 head: dict | None) -> None:
        self.rows, self.bodies, self.key, self.tip, self.head = rows, bodies, key, tip, head
        self.texts = [b.decode() for b in bodies]
        self.args: tuple | None = None
        self.after_found = False     # chain after the head PostgreSQL answered, whatever the tip says
        self.seq0 = self.seq = 0     # the batch's place, set with `args`: after seq0, up to seq (digest last)
        self.last = ""

    def chain_after(self, head: dict | None) -> None:
        self.head, self.args, self.after_found = head, None, True

    def arguments(self) -> tuple:
        if self.args is not None:
            return self.args
        head, rows, n = self.head, self.rows, len(self.rows)
        if self.tip is None:
            digests = _digests(rows, int(head["seq"]), head["hash"], self.bodies)
        else:
            with self.tip:        # the digests only (the tags need no turn): ~1 µs a record
                t = self.tip.get()
                if not self.after_found and t is not None and t["seq"] > int(head["seq"]):
                    head = self.head = t
                digests = _digests(rows, int(head["seq"]), head["hash"], self.bodies)
                self.tip.set(int(head["seq"]) + n, digests[-1])
        tag_of = tagger(self.key)
        seq0, prev = int(head["seq"]), head["hash"]
        self.seq0, self.seq, self.last = seq0, seq0 + n, digests[-1]
        rows_args = (self.texts, [row["prev_hash"] for row in rows], digests, [tag_of(d) for d in digests], seq0)
        if self.tip is None:                # _WRITE_AFTER_HEAD
            self.args = (self.seq, self.last, seq0, prev) + rows_args
        else:                               # _WRITE_AFTER_TIP
            self.args = (seq0, prev, self.seq, seq0, prev, self.last) + rows_args + (self.seq, self.last)
        return self.args


def _log_held_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("audit_held_record_not_written", error_type=type(fut.exception()).__name__)


class Audit:
    def __init__(self, storage: Storage, barrier, settings: AuditSettings | None = None, *,
                 config: Any = None) -> None:
        self.db = storage
        self.barrier = barrier
        self.settings = settings or AuditSettings()
        self.config = config
        self._key: bytes | None = None
        self._link: bytes | None = None
        self._queue: list[tuple[dict, asyncio.Future]] = []   # records waiting for the writer, in order
        self._writer: asyncio.Task | None = None
        # Records made while the barrier is sealed (no audit key, so no tag): held here, in order, and
        # written tagged ahead of everything else once it opens. Only refusals and the unseal itself
        # are answered while sealed; past HELD_MAX they are counted and summarised in one record.
        self._held: list[dict] = []
        self._held_dropped = 0
        self.checkpointer = None           # server.audit.checkpoints.Checkpointer (the primary process)
        self._sinks: list | None = None
        self._head: dict | None = None     # PostgreSQL: the head as this process last wrote it
        self.tip: SharedTip | None = None  # PostgreSQL with several workers: the host's tip (server/audit/tip.py)
        self.metrics = None                # server.metrics.Metrics: the writer's counters in /metrics

    # ----------------------------------------------------------------- HMACs
    async def hmac_key(self) -> bytes | None:
        """The audit key (sealed in audit_head): body HMACs use it, links a key derived from it."""
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
        self._link = link_key(self._key)
        return self._key

    async def link_key(self) -> bytes | None:
        if self._link is None:
            await self.hmac_key()
        return self._link

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
        # One record per request: its future awaited directly (gather's wrapper costs ~7 µs).
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.append((make_row(rec), fut))
        w = self._writer
        if w is None or w.done() or w.get_loop() is not loop:
            self._writer = loop.create_task(self._drain(), name="audit-writer")
        return await fut

    async def append_many(self, recs: list[dict[str, Any]]) -> list[int]:
        """Append records in this order (one group commit when they fit a batch); their sequence numbers."""
        if not recs:
            return []
        rows = [make_row(rec) for rec in recs]      # all or none: a bad one queues none of them
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[int]] = []
        for row in rows:
            fut: asyncio.Future[int] = loop.create_future()
            self._queue.append((row, fut))
            futs.append(fut)
        w = self._writer
        if w is None or w.done() or w.get_loop() is not loop:
            self._writer = loop.create_task(self._drain(), name="audit-writer")
        return list(await asyncio.gather(*futs))

    @property
    def held(self) -> int:
        """Records made while the barrier was sealed, waiting in memory to be written."""
        return len(self._held)

    def _hold(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        for row, fut in batch:
            if len(self._held) < HELD_MAX:
                self._held.append(row)
            else:
                self._held_dropped += 1
            if not fut.done():
                fut.set_result(0)           # not yet in the log: written when the barrier opens
        self._count_held()

    def _count_held(self) -> None:
        if self.metrics is not None:
            self.metrics.audit_held.set(len(self._held))

    def _release_held(self) -> None:
        """Put the held records (and a note of any dropped) at the head of the queue, in order."""
        rows, self._held = self._held, []
        self._count_held()
        if self._held_dropped:
            rows.append(make_row({"plane": "system", "actor": "system", "actor_kind": "system",
                                  "action": "audit.sealed-dropped", "result": "error", "change": False,
                                  "reason": f"{self._held_dropped} record(s) made while the barrier was sealed "
                                  f"were not kept (more than {HELD_MAX})",
                                  "detail": {"count": self._held_dropped}}))
            self._held_dropped = 0
        loop = asyncio.get_running_loop()
        held = []
        for row in rows:
            fut = loop.create_future()      # nobody waits on these: a failed write is logged here
            fut.add_done_callback(_log_held_failure)
            held.append((row, fut))
        self._queue[:0] = held

    async def flush_held(self) -> None:
        """Write what was held while sealed (called when the barrier has opened)."""
        if (self._held or self._held_dropped) and await self.link_key() is not None:
            loop = asyncio.get_running_loop()
            if not self._queue:
                self._release_held()
                w = self._writer
                if w is None or w.done() or w.get_loop() is not loop:
                    self._writer = loop.create_task(self._drain(), name="audit-writer")

    async def _drain(self) -> None:
        """The one writer: commit what is queued, a batch per transaction, until the queue is empty."""
        me = asyncio.current_task()
        batch: list[tuple[dict, asyncio.Future]] = []
        try:
            while self._queue:
                n = min(max(1, int(self.settings.batch_max)), 1000)    # bound the statement's parameters
                if await self.link_key() is None:
                    batch, self._queue = self._queue, []
                    self._hold(batch)
                    batch = []
                    break
                if self._held or self._held_dropped:
                    self._release_held()
                batch, self._queue[:n] = self._queue[:n], []
                m = self.metrics
                start = time.perf_counter()
                try:
                    head_seq = await self._write([row for row, _ in batch])
                except Exception as e:
                    if m is not None:
                        m.audit_write_failures.inc()
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    if m is not None:
                        m.audit_records.inc(len(batch))
                        m.audit_batch_seconds.observe(time.perf_counter() - start)
                    for row, fut in batch:
                        if not fut.done():
                            fut.set_result(row["seq"])
                    if self.checkpointer is not None:
                        self.checkpointer.nudge(head_seq)
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

    async def _write(self, rows: list[dict]) -> int:
        """One transaction: reserve len(rows) sequence numbers, chain and tag the rows in order, insert,
        move the head. Never without the link key: a record made while sealed waits (see `_held`)."""
        key = self._link if self._link is not None else await self.link_key()
        if key is None:
            from server.errors import Sealed
            raise Sealed(self.barrier.sealed_reason)
        bodies = [canon_body(row) for row in rows]      # once, before any lock; every try chains from them
        inline = getattr(self.db, "sync_transaction", None)
        if inline is not None:          # SQLite: the whole transaction at once, on this thread
            return await inline(functools.partial(_append_sync, rows, key, bodies))
        seq = await self._write_after_known_head(rows, key, bodies)
        if seq is not None:
            return seq
        async with self.db.transaction() as tx:        # the head's row lock from here to COMMIT
            head = await tx.fetchone(_RESERVE, len(rows))
            seq, values, last = _chain(rows, head, key, bodies)
            await tx.execute(f"WITH ins AS ({_insert_sql(len(values))}) {_SET_HEAD}",
                             *(v for r in values for v in r), last)
        self._head = None
        if self.tip is not None:
            with self.tip:       # a batch in flight that was not chained after this one is refused anyway
                self.tip.set(seq, last)
        return seq

    async def _write_after_known_head(self, rows: list[dict], key: bytes, bodies: list[bytes]) -> int | None:
        """PostgreSQL: the batch chained after the head this process last saw and written, with the head's
        move, in ONE autocommitted statement; None after OPTIMISTIC_TRIES (the caller then locks the head).

        Why: locking the head for a read, then writing, holds its row lock over two more round trips, each
        waiting for a turn of a busy event loop; two workers then queued on the lock and used 1.2-1.4 of
        2 cores. Here the lock lives only inside PostgreSQL's statement. When the head has moved meanwhile
        (another worker or replica wrote) the statement writes nothing and answers the head it found, and
        the batch is chained again after that one: no error, no second read.

        With several workers on this host the batch is chained after the host's tip (`self.tip`: the end
        of the last batch any of them sent) instead, so it waits in PostgreSQL for that batch to commit
        rather than being refused for it. Refused while that batch has not landed (ours overtook it on
        the way), the same statement is sent again, at most RESENDS times."""
        tip = self.tip
        batch = _Batch(rows, bodies, key, tip, self._head)
        sql = _WRITE_AFTER_HEAD if tip is None else _WRITE_AFTER_TIP
        tries = resends = 0
        while tries < OPTIMISTIC_TRIES:
            if batch.head is None:
                batch.head = await self.db.fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
                if batch.head is None:
                    return None
            try:        # PostgresStorage: the one storage without `sync_transaction`
                got = await self.db.fetchone_at_send(sql, batch.arguments)
            except Exception:
                self._head = None
                if batch.args is not None:
                    self._drop_tip(batch.seq, batch.last)
                raise
            if got is not None and got["written"] == len(rows):
                self._head = {"seq": batch.seq, "hash": batch.last}
                return batch.seq
            if self.metrics is not None:
                self.metrics.audit_head_moved.inc()
            if tip is not None and got is not None and int(got["seq"]) < batch.seq0 and resends < RESENDS:
                resends += 1        # the batch before ours is still on its way: the same statement again
                await asyncio.sleep(0.0003 * resends)
                continue
            tries += 1
            self._drop_tip(batch.seq, batch.last)
            batch.chain_after(None if got is None else {"seq": got["seq"], "hash": got["hash"]})
        self._head = None
        return None

    def _drop_tip(self, seq: int, digest: str) -> None:
        """Our batch will not land: a tip that names its end would only get the next batches refused."""
        if self.tip is None:
            return
        with self.tip:
            t = self.tip.get()
            if t is not None and t["seq"] == seq and t["hash"] == digest:
                self.tip.set(0, GENESIS)

    async def event(self, action: str, *, actor: str, actor_kind: str = "system", keystore_id: int | None = None,
                    key_id: str | None = None, result: str = "ok", reason: str | None = None,
                    detail: dict | None = None, project_id: int | None = None,
                    change: bool | None = None) -> int | None:
        """A decision taken outside one request (approval applied, expired...)."""
        if not self.settings.enabled:
            return None
        return await self.append({"plane": "system", "actor": actor, "actor_kind": actor_kind, "action": action,
                                  "project_id": project_id, "keystore_id": keystore_id, "key_id": key_id,
                                  "change": change, "result": result, "reason": reason, "detail": detail})

    # ---------------------------------------------------------------- reading
    async def query(self, *, since: str | None = None, until: str | None = None, actor: str | None = None,
                    plane: str | None = None, key_id: str | None = None, keystore_id: int | None = None,
                    result: str | None = None, action: str | None = None, after_seq: int = 0,
                    before_seq: int | None = None, limit: int = 100, changes: bool = False,
                    project_ids: list[int] | None = None, newest_first: bool = False) -> list[dict]:
        """Records matching every filter given. `project_ids` (a scoped operator's projects) keeps
        only those projects' records; `newest_first` pages down from `before_seq`."""
        where, args = ["seq > ?"], [after_seq]
        if before_seq is not None:
            where.append("seq < ?"), args.append(before_seq)
        for col, val in (("actor", actor), ("plane", plane), ("key_id", key_id), ("keystore_id", keystore_id),
                         ("result", result)):
            if val is not None:
                where.append(f"{col} = ?"), args.append(val)
        if action is not None:
            # `key` matches every key.* action; `key.create` only itself.
            if "." in action:
                where.append("action = ?"), args.append(action)
            else:
                where.append("action LIKE ?"), args.append(action.replace("%", "").replace("_", "") + ".%")
        if changes:
            where.append("change = 1")
        if project_ids is not None:
            if not project_ids:
                return []
            where.append(f"project_id IN ({', '.join('?' * len(project_ids))})"), args.extend(project_ids)
        if since:
            where.append("at >= ?"), args.append(since)
        if until:
            where.append("at < ?"), args.append(until)
        order = "DESC" if newest_first else ""
        rows = await self.db.fetchall(f"SELECT * FROM audit_log WHERE {' AND '.join(where)} "
                                      f"ORDER BY seq {order} LIMIT ?", *args, limit)
        return [to_api(r) for r in rows]

    # ------------------------------------------------------------- verifying
    def sinks(self) -> list:
        if self._sinks is None:
            from server.audit.checkpoints import sinks_for
            self._sinks = sinks_for(self.config, self.settings)
        return self._sinks

    async def public_key(self):
        from server.audit.checkpoints import checkpoint_key
        if self.barrier.sealed:
            from server.errors import Sealed
            raise Sealed(self.barrier.sealed_reason)
        return (await checkpoint_key(self.db, self.barrier)).public_key()

    async def checkpoints(self) -> tuple[list[dict], list[str], str | None]:
        """(checkpoints signed by this installation, the sinks read, the current epoch)."""
        from server.audit import checkpoints as cp
        pub = await self.public_key()
        ep = await cp.epoch(self.db, self.barrier)
        found, read = await cp.load_all(self.sinks(), pub)
        return found, read, ep

    async def verify(self) -> VerifyResult:
        """The keyed chain and the checkpoints; while the barrier is sealed only digests, and never `intact`."""
        key = await self.link_key()
        if key is None:
            res = await verify_chain(self.db)
            res.cannot_check("the barrier is sealed: only digests were checked, not the tags or the checkpoints; "
                             "verify again once the server is unsealed")
            return res
        if self.checkpointer is not None and not self.checkpointer.announced.is_set():
            # Just started: the start checkpoint is on its way (bounded; a slow sink is reported, not awaited).
            try:
                await asyncio.wait_for(self.checkpointer.announced.wait(), 10)
            except asyncio.TimeoutError:
                pass
        return await verify_database(self.db, self.barrier, key, self.sinks())


async def verify_database(db, barrier, key: bytes | None, sinks: list) -> VerifyResult:
    """The live check, also run by `skm audit verify --data-dir` once it has unsealed a barrier:
    keyed tags and the checkpoints read back from `sinks` (nothing is made in the database)."""
    from server.audit.checkpoints import EpochForged, find
    try:
        found = await find(db, barrier, sinks)
    except EpochForged as e:
        head = await db.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        return VerifyResult(False, 0, int(head or 0), None, str(e), keyed=key is not None)
    return await verify_chain(db, key=key, checkpoints=found.checkpoints, epoch=found.epoch, sources=found.read,
                              unreadable=found.unreadable, foreign=found.foreign)


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
