"""Throwaway PostgreSQL clusters for tests, and storage fixtures over both backends.

One private trust cluster per pytest session (started on first use, stopped and
deleted at session end even when tests fail); every test gets its own database.

Use in a test module (import the fixtures by name; pytest finds them there):

    from tests.support.postgres import pg_cluster, pg_url, storage, storage_url  # noqa: F401

    async def test_x(storage):        # runs twice: SQLite in tmp_path, PostgreSQL fresh database
        await storage.execute("...")

    async def test_y(pg_url):         # "postgresql://postgres@127.0.0.1:PORT/t_..." (fresh database)
        ...

    async def test_z(pg_cluster):     # the shared cluster: stop()/start()/restart() (or *_async
        await pg_cluster.stop_async() # from a running event loop), create_database(), url()
        await pg_cluster.start_async()

Or make them visible to every test from tests/conftest.py with
`from tests.support.postgres import *` (all fixtures are in __all__). Tests skip with a clear reason when PostgreSQL is
not installed. Outside pytest: `with PostgresCluster() as c: url = c.create_database()`.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from server.storage.base import Storage
from server.storage.factory import open_storage

__all__ = ["PostgresCluster", "find_pg_bindir", "free_port", "pg_cluster", "pg_url", "session_cluster",
           "session_cluster_log", "skip_reason", "storage", "storage_url"]

PG_USER = "postgres"
INSTALL_HINT = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: apt-get install postgresql"
DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "300",
}


def find_pg_bindir() -> Path | None:
    """The newest installed PostgreSQL bin directory holding initdb and pg_ctl."""
    def major(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and os.access(os.path.join(os.path.dirname(found), "initdb"), os.X_OK):
        return Path(found).parent
    return None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    if find_pg_bindir() is None:
        return INSTALL_HINT
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root but there is no '{PG_USER}' user to run the server: apt-get install postgresql"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _major_version(bindir: Path) -> int:
    out = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"\)\s+(\d+)", out)   # "pg_ctl (PostgreSQL) 15.18 (Debian ...)"
    return int(m.group(1)) if m else 0


def _stop_and_remove(base: str, pg_ctl: str, as_postgres: bool) -> None:
    """Stop whatever runs in `base`/data and delete `base`; safe to call twice."""
    data = os.path.join(base, "data")
    pidfile = os.path.join(data, "postmaster.pid")
    if os.path.exists(pidfile):
        for mode in ("fast", "immediate"):
            cmd = [pg_ctl, "-D", data, "-m", mode, "-w", "-t", "20", "stop"]
            if as_postgres:
                cmd = ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
            with contextlib.suppress(Exception):
                subprocess.run(cmd, cwd=base, capture_output=True, timeout=30)
            if not os.path.exists(pidfile):
                break
        else:
            with contextlib.suppress(Exception):
                pid = int(Path(pidfile).read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
    shutil.rmtree(base, ignore_errors=True)


class PostgresCluster:
    """A private trust-auth cluster in a temp dir; the port stays fixed across restarts."""

    def __init__(self, bindir: Path | None = None, settings: dict[str, str] | None = None) -> None:
        found = bindir or find_pg_bindir()
        if found is None:
            raise RuntimeError(INSTALL_HINT)
        self.bindir = found
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.major = _major_version(found)
        self.as_postgres = os.geteuid() == 0
        self.base: Path | None = None
        self.port = 0
        self.running = False
        self._finalizer: weakref.finalize | None = None

    # -- paths and commands ------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "cluster not created"
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        assert self.base is not None, "cluster not created"
        return self.base / "postgres.log"

    def _run(self, args: list[str], *, as_server_user: bool = True, timeout: float = 60) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if as_server_user and self.as_postgres:
            cmd = ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        p = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        if p.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}"
                               f"{self._log_tail()}")
        return p.stdout

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AssertionError):
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(tail) if tail else ""

    # -- lifecycle ---------------------------------------------------------

    def create(self) -> "PostgresCluster":
        """initdb into a new temp dir and start the server on a free port."""
        self.base = Path(tempfile.mkdtemp(prefix="skm-pg-"))
        # Registered first so a failure below still removes the directory.
        self._finalizer = weakref.finalize(self, _stop_and_remove, str(self.base),
                                           str(self.bindir / "pg_ctl"), self.as_postgres)
        try:
            if self.as_postgres:
                pw = pwd.getpwnam(PG_USER)
                os.chown(self.base, pw.pw_uid, pw.pw_gid)
            os.chmod(self.base, 0o700)
            self._run(["initdb", "-D", str(self.data_dir), "-A", "trust", "-U", PG_USER,
                       "--no-sync", "-E", "UTF8", "--locale=C"], timeout=120)
            for attempt in range(5):
                self.port = free_port()
                try:
                    self.start()
                    break
                except RuntimeError:
                    if attempt == 4:
                        raise
        except BaseException:
            self.destroy()
            raise
        return self

    def start(self) -> None:
        opts = [f"-p {self.port}", f"-k {self.base}"] + [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60",
                   "-o", " ".join(opts), "start"], timeout=90)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (clean, disconnects clients) or "immediate" (like a crash)."""
        self._run(["pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"], timeout=90)
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    async def stop_async(self, mode: str = "fast") -> None:
        await asyncio.to_thread(self.stop, mode)

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def destroy(self) -> None:
        """Stop the server (however it is) and delete every file."""
        self.running = False
        if self._finalizer is not None:
            self._finalizer()   # runs at most once

    def __enter__(self) -> "PostgresCluster":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- databases ---------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database; return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        # FILE_COPY (PostgreSQL 15+) beats WAL-logging the template when fsync is off.
        strategy = ["--strategy=file_copy"] if self.major >= 15 else []
        self._run(["createdb", *strategy, "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name],
                  as_server_user=False)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._run(["dropdb", "--force", "--if-exists", "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", PG_USER, name], as_server_user=False)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database for the block, dropped afterwards (if the server is up)."""
        url = self.create_database()
        try:
            yield url
        finally:
            if self.running:
                with contextlib.suppress(Exception):
                    self.drop_database(url.rsplit("/", 1)[1])


# -- pytest fixtures ---------------------------------------------------------

_CLUSTER = pytest.StashKey["PostgresCluster"]()


def session_cluster(config: pytest.Config) -> PostgresCluster:
    """The session's shared cluster (one per pytest run however the fixtures are imported)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = config.stash.get(_CLUSTER, None)
    if cluster is None:
        cluster = PostgresCluster()
        config.add_cleanup(cluster.destroy)
        cluster.create()
        config.stash[_CLUSTER] = cluster
    cluster.ensure_running()   # a failed test may have left it stopped
    return cluster


def session_cluster_log(config: pytest.Config) -> Path | None:
    """The session cluster's server log, when this session started one (nothing is started here)."""
    cluster = config.stash.get(_CLUSTER, None)
    return cluster.log_file if cluster is not None and cluster.base is not None else None


@pytest.fixture
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    """The shared cluster; restarted afterwards if the test left it stopped."""
    cluster = session_cluster(request.config)
    yield cluster
    cluster.ensure_running()


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh database on the shared cluster."""
    with session_cluster(request.config).database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL per backend: SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'skm.db'}"
    else:
        with session_cluster(request.config).database() as url:
            yield url


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    """An opened (migrated) Storage on each backend."""
    s = open_storage(storage_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
