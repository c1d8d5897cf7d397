"""One audit writer per host when the key server runs several workers (`workers = N`).

Measured before this existed (py-spy --native on `--workers 2`, SQLite, secret reads at c=64): each
worker's writer connection spent about a third of its time in SQLite's busy handler (`usleep` under
`sqlite3InvokeBusyHandler`), waiting for the other worker's audit transaction to release the file's
write lock; the handler polls with sleeps of up to tens of milliseconds, so the two workers took
turns and together used one core. On PostgreSQL they queue on the `audit_head` row lock instead.

So worker 0 writes the host's audit records and the others hand theirs to it:

* worker 0 listens on `<rundir>/audit.sock` (a Unix stream socket in the supervisor's 0700 run
  directory: only the server's user reaches it); a frame is a 4-byte big-endian length and a JSON
  object. A worker sends `{"id": n, "rows": [...]}` (rows already shaped by `Audit._row`) and gets
  `{"id": n, "seqs": [...]}` once worker 0's group commit holding them has landed, or
  `{"id": n, "error": "..."}`;
* the records join worker 0's own queue, so one writer chains the host's records and one
  transaction commits many workers' records together;
* fail closed: a worker's requests wait for that acknowledgement, and a frame whose answer is lost
  (worker 0 died after receiving it) fails its requests (503), since its records may or may not be
  written. When worker 0 cannot be reached at all (restarting), a worker writes its batch itself,
  as before: the chain stays one line either way, because every write moves the one `audit_head`
  row inside its transaction.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from server import logs
from server.errors import Unavailable

log = logs.get("skm.audit.host")

SOCKET_NAME = "audit.sock"
MAX_FRAME = 16 * 2**20            # 1000 records of a few KB each fit easily
ANSWER_TIMEOUT = 30.0             # a commit slower than this fails its requests (fail closed)
_LEN = struct.Struct(">I")


class HostUnreachable(Exception):
    """Nothing was sent: the caller may write the batch itself."""


class BadFrame(ValueError):
    """A frame that is not what a worker sends (our own text only: safe to answer with)."""


async def _read_frame(reader: asyncio.StreamReader) -> dict | None:
    try:
        head = await reader.readexactly(_LEN.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise BadFrame(f"audit frame of {n} bytes is over the limit")
    try:
        data = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise BadFrame("audit frame is not a JSON object")
    return obj


def _frame(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


# ------------------------------------------------------------------ worker 0: the writer
class HostWriter:
    """Accepts other workers' records on `<rundir>/audit.sock` and appends them through `audit`."""

    def __init__(self, audit, rundir: Path) -> None:
        self.audit = audit
        self.path = rundir / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    frame = await _read_frame(reader)
                except ValueError as e:
                    log.error("audit_host_frame_refused", reason=str(e))
                    return
                if frame is None:
                    return
                t = asyncio.ensure_future(self._one(frame, writer))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        finally:
            writer.close()

    async def _one(self, frame: dict, writer: asyncio.StreamWriter) -> None:
        ident = frame.get("id")
        try:
            rows = _check_rows(frame.get("rows"), self.audit.row_fields)
            seqs = await self.audit.append_rows(rows)
            answer = {"id": ident, "seqs": seqs}
        except Exception as e:  # noqa: BLE001 - the sender fails its requests with this reason
            answer = {"id": ident, "error": _reason(e)}
        if not writer.is_closing():
            writer.write(_frame(answer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):          # let commits in flight answer (the audit writer finishes them)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(t), 10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _check_rows(rows: Any, fields: frozenset[str]) -> list[dict]:
    if not isinstance(rows, list) or not rows or len(rows) > 1000:
        raise BadFrame("rows must be a list of 1 to 1000 records")
    for r in rows:
        if not isinstance(r, dict) or set(r) != fields:
            raise BadFrame("a record does not have the audit fields")
    return rows


def _reason(e: Exception) -> str:
    """What the sender may hear: our own messages, never a driver's text."""
    msg = str(e) if isinstance(e, BadFrame) else (getattr(e, "message", None) or type(e).__name__)
    return str(msg)[:300]


# ------------------------------------------------------------------ other workers: the client
class HostWriterClient:
    """A worker's connection to worker 0's writer; `write(rows)` returns the records' sequence numbers."""

    def __init__(self, rundir: Path, timeout: float = ANSWER_TIMEOUT) -> None:
        self.path = rundir / SOCKET_NAME
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._connecting = asyncio.Lock()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            w, r = self._writer, self._reader
            if w is not None and not w.is_closing() and r is not None and not r.at_eof():
                return w
            if w is not None:               # worker 0 closed its end (EOF seen, not yet handled): start afresh
                self._writer = None
                w.close()
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError as e:
                raise HostUnreachable(str(e)) from None
            self._writer, self._reader = writer, reader
            self._reader_task = asyncio.get_running_loop().create_task(self._answers(reader, writer),
                                                                       name="audit-host-answers")
            log.info("audit_host_connected")
            return writer

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    frame = await _read_frame(reader)
                except ValueError:
                    frame = None
                if frame is None:
                    break
                fut = self._pending.pop(frame.get("id"), None)
                if fut is None or fut.done():
                    continue
                if "error" in frame:
                    log.warning("audit_host_write_failed", reason=str(frame["error"])[:300])
                    fut.set_exception(Unavailable(f"the audit log cannot be written ({frame['error']})"))
                else:
                    fut.set_result(frame.get("seqs"))
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._fail_pending("the host's audit writer went away before it answered")

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            log.warning("audit_host_answer_lost", batches=len(pending), reason=why)
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(why))

    async def write(self, rows: list[dict]) -> list[int]:
        """Hand `rows` to worker 0; their sequence numbers once committed.

        Raises HostUnreachable when nothing could be sent, Unavailable when the answer is lost or an
        error (the records may or may not be written: their requests fail)."""
        writer = await self._connect()
        self._next += 1
        ident = self._next
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        try:
            writer.write(_frame({"id": ident, "rows": rows}))
            await writer.drain()
        except (ConnectionError, OSError) as e:
            # The frame did not reach worker 0 whole (its end was already closed, or closed while part of
            # it waited in our buffer): an incomplete frame is never committed, so the caller may write it.
            self._pending.pop(ident, None)
            raise HostUnreachable(f"sending to the host's audit writer failed ({type(e).__name__})") from None
        try:
            seqs = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._pending.pop(ident, None)
            raise Unavailable("the host's audit writer did not answer in time") from None
        if not isinstance(seqs, list) or len(seqs) != len(rows):
            raise Unavailable("the host's audit writer answered for other records")
        return seqs

    async def close(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        self._fail_pending("the worker is stopping")
