"""Several key-server processes on one data-plane port (`workers = N`, SO_REUSEPORT).

Python answers on one core per process, so `skm server run` with `workers > 1`
becomes a small supervisor that starts N worker processes:

* every worker listens on the same data-plane port with SO_REUSEPORT, and the
  kernel spreads new connections over them;
* worker 0 also serves the management plane and the console and runs the
  background jobs (purge, rotation, approval expiry): console sessions and login
  lockouts live in one process, and nothing runs twice;
* workers hear each other's change events (a deleted certificate, a rotated key)
  so their caches drop what changed: on PostgreSQL through LISTEN/NOTIFY as
  replicas do (server/replication.py), on SQLite through Unix datagram sockets
  in `<data_dir>/run/` (`DatagramChannel`, same relay and heartbeat);
* `/metrics` on any worker adds up every worker's values (prometheus_client's multiprocess
  mode in `<data_dir>/run/metrics/`, emptied at start; a dead worker's live gauges are dropped,
  its counts kept: server/metrics.py);
* the supervisor reserves the data port before any worker starts (a bound,
  non-listening SO_REUSEPORT socket, so port 0 works), starts worker 0 first
  (migrations, audit key) and the rest once it is ready, prints one "listening"
  line, and restarts a worker that dies, with backoff. A worker that fails
  during start-up stops the whole group with its exit status: a wrong root key
  must not become a restart loop.

A worker learns its place from SKM_WORKER_* variables set by the supervisor;
they are not a user setting.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from server import logs

log = logs.get("skm.workers")

ENV_INDEX = "SKM_WORKER_INDEX"
ENV_COUNT = "SKM_WORKER_COUNT"
ENV_DATA_PORT = "SKM_WORKER_DATA_PORT"
ENV_RUNDIR = "SKM_WORKER_RUNDIR"
ENV_READY_FD = "SKM_WORKER_READY_FD"
# prometheus_client's own name for the workers' shared metrics directory (server/metrics.py reads it).
# Here, not in server/metrics.py: the supervisor only watches, and must not load aiohttp and
# prometheus_client for one string.
SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_WORKERS = 64
READY_TIMEOUT = 120.0          # a remote system-key fetch may retry for a while; the local case takes ~1 s
RESTART_BACKOFF = (1.0, 30.0)  # first and largest delay before restarting a dead worker


@dataclass(frozen=True)
class WorkerPlace:
    """What the supervisor told this worker process."""
    index: int
    count: int
    data_port: int
    rundir: Path
    ready_fd: int | None

    @property
    def primary(self) -> bool:
        return self.index == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "WorkerPlace | None":
        env = os.environ if env is None else env
        if ENV_INDEX not in env:
            return None
        fd = env.get(ENV_READY_FD)
        return cls(index=int(env[ENV_INDEX]), count=int(env[ENV_COUNT]), data_port=int(env[ENV_DATA_PORT]),
                   rundir=Path(env[ENV_RUNDIR]), ready_fd=int(fd) if fd else None)

    def ready(self, data_port: int, mgmt_port: int) -> None:
        """Tell the supervisor this worker listens (one line on the inherited pipe)."""
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, f"ready {data_port} {mgmt_port}\n".encode())
            os.close(self.ready_fd)


# ------------------------------------------------------------------ events between workers (SQLite)
class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, deliver: Callable[[str], None]) -> None:
        self.deliver = deliver

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        self.deliver(text)


class DatagramChannel:
    """listen/notify (the Storage interface's pair) between the workers of one host.

    Each worker binds `w<index>.sock` in the run directory (0700, owned by the
    server's user, so only it can send); notify sends one datagram to every
    worker's socket, this one's included, as LISTEN/NOTIFY delivers a sender's
    own notifications. A worker being restarted has no socket for a moment: it
    starts with empty caches, so missing an event costs nothing.
    """

    def __init__(self, rundir: Path, index: int, count: int) -> None:
        self.rundir, self.index, self.count = rundir, index, count
        self._callbacks: dict[str, list[Callable[[str], None]]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)

    def path(self, i: int) -> Path:
        return self.rundir / f"w{i}.sock"

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        self._callbacks.setdefault(channel, []).append(callback)
        if self._transport is None:
            me = self.path(self.index)
            with contextlib.suppress(FileNotFoundError):
                me.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)     # bound here: uvloop takes no path
            sock.bind(str(me))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self._heard), sock=sock)

    def _heard(self, text: str) -> None:
        channel, _, payload = text.partition("\n")
        for cb in self._callbacks.get(channel, ()):
            try:
                cb(payload)
            except Exception:  # noqa: BLE001 - one bad subscriber must not stop the others
                log.exception("worker_event_callback_failed")

    async def notify(self, channel: str, payload: str) -> None:
        data = (channel + "\n" + payload).encode()
        mine_failed: OSError | None = None
        for i in range(self.count):
            try:
                self._send.sendto(data, str(self.path(i)))
            except (FileNotFoundError, ConnectionRefusedError):
                if i == self.index:
                    mine_failed = ConnectionRefusedError("this worker's event socket is gone")
            except OSError as e:           # a full buffer: that worker may miss it; its heartbeat will say so
                if i == self.index:
                    mine_failed = e
        if mine_failed is not None:        # the relay then delivers locally and marks a gap
            raise mine_failed

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        with contextlib.suppress(FileNotFoundError):
            self.path(self.index).unlink()
        self._send.close()


# ------------------------------------------------------------------ the supervisor
def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) an SO_REUSEPORT socket: holds the port, takes no connections, lets workers join."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        from server.errors import ConfigError
        raise ConfigError(f"cannot bind the data plane to {host}:{port} ({e.strerror}); "
                          "choose another [data] port or stop what uses it") from None
    return s


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0


@dataclass
class Supervisor:
    """Start, watch and stop the workers of one key server."""
    count: int
    host: str
    port: int
    rundir: Path
    argv: list[str]                      # the `skm` arguments, e.g. ["server", "run", "--config", "x.toml"]
    workers: list[_Worker] = field(default_factory=list)
    mgmt_port: int = 0
    _stopping: bool = False

    @property
    def metrics_dir(self) -> Path:
        return self.rundir / "metrics"

    def _command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; from server.cli.main import main; sys.exit(main())", *self.argv]

    async def _spawn(self, w: _Worker) -> tuple[int, int]:
        r, wfd = os.pipe()
        env = {**os.environ, ENV_INDEX: str(w.index), ENV_COUNT: str(self.count), ENV_DATA_PORT: str(self.port),
               ENV_RUNDIR: str(self.rundir), ENV_READY_FD: str(wfd), SHARED_DIR_ENV: str(self.metrics_dir)}
        try:
            w.proc = await asyncio.create_subprocess_exec(*self._command(), env=env, pass_fds=(wfd,),
                                                          stdin=asyncio.subprocess.DEVNULL)
        finally:
            os.close(wfd)
        w.started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, _read_line, r), READY_TIMEOUT)
        finally:
            os.close(r)
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ready":
            code = await w.proc.wait()
            raise WorkerFailed(w.index, code)
        return int(parts[1]), int(parts[2])

    async def start(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.rundir, 0o700)
        self.metrics_dir.mkdir(exist_ok=True, mode=0o700)
        _empty(self.metrics_dir)          # a previous run's counts are not this one's
        with contextlib.suppress(FileNotFoundError):
            (self.rundir / "audit-tip").unlink()    # server/audit/tip.py: a previous run's tip is a wrong hint
        self.workers = [_Worker(i) for i in range(self.count)]
        try:
            _, self.mgmt_port = await self._spawn(self.workers[0])       # migrations and audit key first
            await asyncio.gather(*(self._spawn(w) for w in self.workers[1:]))
        except BaseException:
            await self.stop()
            raise

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart workers that die until `stop` is set."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waits = {asyncio.ensure_future(w.proc.wait()): w for w in self.workers if w.proc is not None}
                done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
                for f in waits:
                    if f not in done:
                        f.cancel()
                if stop.is_set():
                    break
                for f in done:
                    w = waits.get(f)
                    if w is not None:
                        await self._restart(w, f.result(), stop)
        finally:
            stopper.cancel()

    async def _restart(self, w: _Worker, code: int, stop: asyncio.Event) -> None:
        # Ctrl-C reaches the whole process group: a worker may stop just before we hear the signal.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if stop.is_set():
            return
        if w.proc is not None:
            from prometheus_client.multiprocess import mark_process_dead
            mark_process_dead(w.proc.pid, str(self.metrics_dir))     # its live gauges; its counts stay
        lived = time.monotonic() - w.started
        w.failures = w.failures + 1 if lived < 60 else 1
        delay = min(RESTART_BACKOFF[0] * 2 ** (w.failures - 1), RESTART_BACKOFF[1])
        log.error("worker_exited", worker=w.index, exit_code=code, restart_in_seconds=delay)
        print(f"key server: worker {w.index} exited with status {code}; restarting in {delay:g} s",
              file=sys.stderr, flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        try:
            await self._spawn(w)
            log.info("worker_restarted", worker=w.index)
        except WorkerFailed as e:
            log.error("worker_restart_failed", worker=w.index, exit_code=e.code)
        except asyncio.TimeoutError:
            log.error("worker_restart_timed_out", worker=w.index)
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()

    async def stop(self, timeout: float = 15.0) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        _empty(self.metrics_dir)


def _empty(d: Path) -> None:
    for f in d.glob("*.db"):
        f.unlink(missing_ok=True)


class WorkerFailed(Exception):
    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} exited with status {code} before it was ready")
        self.index, self.code = index, code


def _read_line(fd: int) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 256)
        if not chunk:          # the worker exited (or closed the pipe) without saying ready
            break
        buf += chunk
    return buf.decode(errors="replace").strip()
