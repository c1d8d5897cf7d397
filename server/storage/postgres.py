"""PostgreSQL backend (asyncpg): several key-server replicas on one database.

Statements arrive with `?` placeholders and are translated to `$1..$n` once
(cached). Migrations run under a transaction-level advisory lock so replicas
starting together migrate once. Job leadership uses session-level advisory
locks on a dedicated connection; change notifications use LISTEN/NOTIFY on
another dedicated connection that reconnects by itself.

While the database cannot be reached (restarting, down, refusing connections)
every statement raises `Unavailable` (503, a clean envelope, nothing of the
driver's text), logged once per outage; the pool replaces the dead connections
on next use, so service resumes by itself when the database is back. The pool
keeps no connection floor (min_size 0): restoring one in the background while
the database is down only fills the log with the driver's stack traces.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
import time
from collections import OrderedDict
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from server import logs
from server.errors import ConfigError, InvalidRequest, Unavailable
from server.storage.base import Column, Executor, Row, Snapshot, Storage
from server.storage.migrations import render

Callback = Callable[[str], Awaitable[None] | None]
log = logs.get("skm.storage")

# What the database being down, restarting or out of connections looks like from here. (TimeoutError:
# connect, acquire or command timeout; it is an OSError on 3.11 but named for clarity.)
_OUTAGE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
           asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)


def is_outage(e: BaseException) -> bool:
    """The database cannot be reached or is going away (not a statement's own error)."""
    if isinstance(e, _OUTAGE):
        return True
    # asyncpg reports a connection that died under it as InterfaceError "connection is closed" too, and
    # one the server terminated while idle as InternalClientError "another operation is in progress"
    # on its next statement (seen on `pg_ctl restart -m fast`).
    if isinstance(e, asyncpg.InterfaceError):
        return "closed" in str(e)
    return isinstance(e, asyncpg.exceptions.InternalClientError)


MIN_SERVER_MAJOR = 12            # the oldest PostgreSQL the key server runs on
_MIGRATION_LOCK = "skm:schema-migrations"

# Everything `?` may hide in: strings (plain and E''), quoted identifiers,
# comments, dollar quotes. Only a bare `?` becomes a placeholder.
_SQL_TOKENS = re.compile(
    r"""(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*'
      | '(?:[^']|'')*'
      | "(?:[^"]|"")*"
      | --[^\n]*
      | /\*.*?\*/
      | (?<![\w$])\$(?P<tag>(?:[A-Za-z_]\w*)?)\$.*?\$(?P=tag)\$
      | \?""",
    re.S | re.X,
)


def translate_placeholders(sql: str) -> str:
    """`?` → `$1..$n`, leaving literals, identifiers and comments alone."""
    if "?" not in sql:
        return sql
    n = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal n
        if m.group(0) != "?":
            return m.group(0)
        n += 1
        return f"${n}"

    return _SQL_TOKENS.sub(sub, sql)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=b"skm-lock").digest()
    return int.from_bytes(digest, "big", signed=True)


def rowcount(status: str) -> int:
    """Rows changed from a command tag: 'UPDATE 3' → 3, 'INSERT 0 1' → 1, 'CREATE TABLE' → 0."""
    last = status.rsplit(" ", 1)[-1] if status else ""
    return int(last) if (last.isascii() and last.isdigit()) else 0


class _SqlCache:
    """A small LRU of translated statements."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._cache: OrderedDict[str, str] = OrderedDict()

    def __call__(self, sql: str) -> str:
        out = self._cache.get(sql)
        if out is None:
            out = translate_placeholders(sql)
            self._cache[sql] = out
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(sql)
        return out


class _Conn(Executor):
    def __init__(self, conn: asyncpg.Connection, sql: _SqlCache) -> None:
        self.conn = conn
        self._sql = sql

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row = await self.conn.fetchrow(self._sql(sql), *args)
        return None if row is None else dict(row)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self.conn.fetch(self._sql(sql), *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        return rowcount(await self.conn.execute(self._sql(sql), *args))

    async def insert_rows(self, table: str, columns, rows) -> None:
        # COPY: a restore of 100,000 keys in seconds, not minutes of single-row INSERTs.
        await self.conn.copy_records_to_table(table, columns=list(columns), records=rows)


class _Snapshot(_Conn, Snapshot):
    dialect = "postgresql"

    async def execute(self, sql: str, *args: Any) -> int:
        return await Snapshot.execute(self, sql, *args)

    async def stream(self, sql: str, *args: Any, batch: int = 1000) -> AsyncIterator[list[tuple]]:
        cur = await self.conn.cursor(self._sql(sql), *args)
        while True:
            rows = await cur.fetch(batch)
            if not rows:
                return
            yield [tuple(r) for r in rows]

    async def tables(self) -> list[str]:
        rows = await self.fetchall("SELECT table_name AS name FROM information_schema.tables WHERE table_schema = "
                                   "current_schema() AND table_type = 'BASE TABLE' AND table_name <> "
                                   "'schema_version' ORDER BY table_name")
        return [r["name"] for r in rows]

    async def columns(self, table: str) -> list[Column]:
        rows = await self.fetchall("SELECT column_name AS name, data_type AS type FROM information_schema.columns "
                                   "WHERE table_schema = current_schema() AND table_name = ? ORDER BY "
                                   "ordinal_position", table)
        return [Column(r["name"], r["type"] == "bytea") for r in rows]

    async def sequences(self) -> dict[str, int]:
        rows = await self.fetchall(
            "SELECT c.table_name AS t, pg_get_serial_sequence(quote_ident(c.table_name), c.column_name) AS s "
            "FROM information_schema.columns c WHERE c.table_schema = current_schema() "
            "AND c.column_default LIKE 'nextval(%' ORDER BY c.table_name")
        out: dict[str, int] = {}
        for r in rows:
            if r["s"]:
                seq = await self.fetchone(f"SELECT last_value, is_called FROM {r['s']}")
                if seq is not None and seq["is_called"]:
                    out[r["t"]] = int(seq["last_value"])
        return out


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """Strip our own `pool_*` query options from the DSN asyncpg gets."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k.startswith("pool_")}
    rest = [(k, v) for k, v in query if not k.startswith("pool_")]
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


async def _no_session_state(_conn: asyncpg.Connection) -> None:
    """What the pool runs on a connection handed back (after asyncpg rolls back any open transaction).

    asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every release:
    a round trip per statement we run, as many as the statements themselves. Pooled connections keep no
    session state here: session advisory locks and LISTEN live on dedicated connections (below), a
    backup's snapshot is a transaction, and the only SET is `SET LOCAL`, gone at commit."""


class PostgresStorage(Storage):
    dialect = "postgresql"

    def __init__(self, url: str, *, max_size: int | None = None, connect_timeout: float = 10.0,
                 command_timeout: float | None = 30.0, acquire_timeout: float = 30.0) -> None:
        dsn, opts = _split_url(url)
        self._dsn = dsn
        self._max_size = max_size or int(opts.get("pool_max_size", 10))
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._acquire_timeout = acquire_timeout
        self._sql = _SqlCache()
        self._pool: asyncpg.Pool | None = None
        self._closing = False
        self._down_since: float | None = None     # monotonic time the current outage was first seen
        # leadership locks
        self._lock_conn: asyncpg.Connection | None = None
        self._lock_mutex = asyncio.Lock()
        self._held: set[str] = set()
        # notifications
        self._listen_conn: asyncpg.Connection | None = None
        self._listen_mutex = asyncio.Lock()
        self._channels: dict[str, list[Callback]] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._callback_tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn, timeout=self._connect_timeout,
                                     command_timeout=self._command_timeout,
                                     server_settings={"application_name": "skm"})

    async def open(self) -> None:
        self._closing = False
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=0, max_size=self._max_size, timeout=self._connect_timeout,
            command_timeout=self._command_timeout, server_settings={"application_name": "skm"},
            reset=_no_session_state)
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        async with self._acquire() as conn, conn.transaction():
            version = conn.get_server_version()
            if version.major < MIN_SERVER_MAJOR:
                # The audit's batch statement needs `AS MATERIALIZED` (server/audit/log.py): refuse at start
                # rather than refuse every request at its first audit write.
                raise ConfigError(f"PostgreSQL {MIN_SERVER_MAJOR} or later is needed; the server at this storage "
                                  f"URL runs {version.major}.{version.minor}: upgrade it, or use another server")
            # Held until commit: replicas starting together queue here.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(_MIGRATION_LOCK))
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            # Every migration not yet recorded, in list order (see sqlite.py).
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
            for version, statements in self.migrations:
                if version in applied:
                    continue
                for stmt in statements:
                    await conn.execute(render(stmt, self.dialect))
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)

    async def close(self) -> None:
        self._closing = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        for t in list(self._callback_tasks):
            t.cancel()
        self._held.clear()
        for attr in ("_listen_conn", "_lock_conn"):
            conn: asyncpg.Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 5)
                except Exception:
                    conn.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:
                pool.terminate()

    # -- statements --------------------------------------------------------

    def _acquire(self) -> Any:
        if self._pool is None:
            raise RuntimeError("storage is not open")
        return self._pool.acquire(timeout=self._acquire_timeout)

    def _unavailable(self, e: BaseException) -> Unavailable:
        """The error a caller sees while the database is unreachable; the first one of an outage is logged."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("database_unavailable", error_type=type(e).__name__)
        return Unavailable("the database cannot be reached; try again shortly")

    def _reachable(self) -> None:
        if self._down_since is not None:
            log.info("database_available", seconds_unavailable=round(time.monotonic() - self._down_since, 1))
            self._down_since = None

    @asynccontextmanager
    async def _connection(self, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction when asked), with an outage turned into Unavailable.

        A connection lost mid-transaction (or at COMMIT) is Unavailable too: the caller never
        acknowledges that write, whether or not the database kept it."""
        try:
            async with self._acquire() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except Exception as e:
            if is_outage(e):
                raise self._unavailable(e) from None
            if isinstance(e, asyncpg.exceptions.CharacterNotInRepertoireError):
                # A NUL in a text value (SQLite stores it; PostgreSQL's text cannot): the request's input,
                # answered 400 rather than 500 wherever it was not caught before.
                raise InvalidRequest("the request holds a NUL character, which cannot be stored; remove it") from None
            raise
        if self._down_since is not None:
            self._reachable()

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self._connection() as conn:
            return await _Conn(conn, self._sql).fetchone(sql, *args)

    async def fetchone_at_send(self, sql: str, arguments: Callable[[], Sequence[Any]]) -> Row | None:
        """`fetchone` with its arguments made by `arguments()` once a connection is in hand: nothing
        between that call and the statement's leaving waits (a prepared statement is sent at once), so
        what `arguments()` claims is sent in the order it was claimed (the audit's shared tip)."""
        async with self._connection() as conn:
            return await _Conn(conn, self._sql).fetchone(sql, *arguments())

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self._connection() as conn:
            return await _Conn(conn, self._sql).fetchall(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._connection() as conn:
            return await _Conn(conn, self._sql).execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._connection(transaction=True) as conn:
            await conn.executemany(self._sql(sql), rows)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._connection(transaction=True) as conn:
            yield _Conn(conn, self._sql)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        # Its own connection (a long read must not hold a pooled one) and no statement timeout: the
        # transaction's snapshot is what keeps the backup consistent, however long it streams.
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout, command_timeout=None,
                                         server_settings={"application_name": "skm-backup"})
        except Exception as e:
            if is_outage(e):
                raise self._unavailable(e) from None
            raise
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield _Snapshot(conn, self._sql)
        finally:
            with suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    async def set_sequences(self, tx: Executor, sequences: dict[str, int]) -> None:
        rows = await tx.fetchall(
            "SELECT c.table_name AS t, c.column_name AS col, "
            "pg_get_serial_sequence(quote_ident(c.table_name), c.column_name) AS s "
            "FROM information_schema.columns c WHERE c.table_schema = current_schema() "
            "AND c.column_default LIKE 'nextval(%'")
        for r in rows:
            if not r["s"]:
                continue
            top = await tx.fetchval(f"SELECT MAX({r['col']}) FROM {r['t']}")
            last = max(int(top or 0), int(sequences.get(r["t"], 0)))
            if last > 0:
                await tx.fetchval("SELECT setval(?::regclass, ?)", r["s"], last)

    # -- leadership --------------------------------------------------------

    def _lock_conn_lost(self, conn: asyncpg.Connection) -> None:
        if conn is self._lock_conn:
            self._lock_conn = None
            self._held.clear()   # the server dropped every session lock with it

    async def _locks(self) -> asyncpg.Connection:
        conn = self._lock_conn
        if conn is not None and not conn.is_closed():
            return conn
        self._held.clear()
        conn = await self._connect()
        conn.add_termination_listener(self._lock_conn_lost)
        self._lock_conn = conn
        return conn

    async def try_lock(self, name: str) -> bool:
        """Leadership for `name` until unlock(), close(), or this connection dies.

        Idempotent: asking again while holding it returns True (after checking
        the connection still lives) without stacking the lock.
        """
        async with self._lock_mutex:
            if self._closing:
                return False
            if name in self._held and self._lock_conn is not None:
                conn = self._lock_conn
                try:
                    await conn.fetchval("SELECT 1")
                    return True
                except Exception:
                    # Dead or broken mid-termination: drop it with its locks.
                    self._lock_conn_lost(conn)
                    conn.terminate()
            conn = await self._locks()
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(name)))
            if got:
                self._held.add(name)
            return got

    async def unlock(self, name: str) -> None:
        async with self._lock_mutex:
            if name not in self._held:
                return
            self._held.discard(name)
            conn = self._lock_conn
            if conn is not None and not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key(name))

    # -- notifications -----------------------------------------------------

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for cb in list(self._channels.get(channel, ())):
            result = cb(payload)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)

    def _listen_conn_lost(self, conn: asyncpg.Connection) -> None:
        if conn is not self._listen_conn:
            return
        self._listen_conn = None
        if not self._closing and self._reconnect_task is None:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.1
        try:
            while not self._closing:
                try:
                    async with self._listen_mutex:
                        await self._listen_connection()
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self._reconnect_task = None

    async def _listen_connection(self) -> asyncpg.Connection:
        """The LISTEN connection, (re)connected with every known channel."""
        conn = self._listen_conn
        if conn is not None and not conn.is_closed():
            return conn
        conn = await self._connect()
        try:
            for channel in self._channels:
                await conn.add_listener(channel, self._dispatch)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._listen_conn_lost)
        self._listen_conn = conn
        return conn

    async def listen(self, channel: str, callback: Callback) -> None:
        """Call `callback(payload)` for every NOTIFY on `channel` (sync or async callback)."""
        async with self._listen_mutex:
            first = channel not in self._channels
            self._channels.setdefault(channel, []).append(callback)
            try:
                if self._reconnect_task is not None:
                    return  # the reconnect will LISTEN on it
                conn = self._listen_conn
                if conn is None or conn.is_closed():
                    await self._listen_connection()
                elif first:
                    await conn.add_listener(channel, self._dispatch)
            except BaseException:
                self._channels[channel].remove(callback)
                if not self._channels[channel]:
                    del self._channels[channel]
                raise

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify(?, ?)", channel, payload)
