"""Tell a program its rendered file changed: a signal to the pid in a pidfile, a command, or a local POST.

The outcome is `ok`, `failed` or `no_target` (a pidfile that is missing or names a process that is
gone: nothing runs that could have read the old file). Command output is discarded (it could echo
what it loaded); only the exit status is kept.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from dataclasses import dataclass, field

import aiohttp

from server import timeutil
from sidecar.render_config import ReloadAction

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ReloadOutcome:
    action: str                     # signal | command | post
    outcome: str                    # ok | failed | no_target
    detail: str                     # "SIGHUP to pid 4242", "exit status 0", "HTTP 204", why it failed
    at: str = field(default_factory=lambda: timeutil.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    def to_json(self) -> dict:
        return {"action": self.action, "outcome": self.outcome, "detail": self.detail, "at": self.at}


async def run_reload(action: ReloadAction, name: str, destination: str, timeout: float) -> ReloadOutcome:
    if action.kind == "signal":
        return _signal(action)
    if action.kind == "command":
        return await _command(action, name, destination, timeout)
    return await _post(action, name, destination, timeout)


def _signal(a: ReloadAction) -> ReloadOutcome:
    sig = signal.Signals(a.signal).name
    try:
        fd = os.open(a.pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return ReloadOutcome("signal", "no_target", f"pidfile {a.pidfile} does not exist")
    except OSError as e:
        return ReloadOutcome("signal", "failed", f"pidfile {a.pidfile} cannot be read ({e.strerror})")
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IWOTH:
        # Whoever can write it could point our signal at any process.
        return ReloadOutcome("signal", "failed", f"pidfile {a.pidfile} is writable by others or not a file; "
                                                 "refusing to signal the pid it names")
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) <= 1:
        return ReloadOutcome("signal", "failed", f"pidfile {a.pidfile} does not hold a pid")
    pid = int(text)
    try:
        os.kill(pid, a.signal)
    except ProcessLookupError:
        return ReloadOutcome("signal", "no_target", f"pid {pid} from {a.pidfile} is not running")
    except PermissionError:
        return ReloadOutcome("signal", "failed", f"not allowed to signal pid {pid}")
    return ReloadOutcome("signal", "ok", f"{sig} to pid {pid}")


async def _command(a: ReloadAction, name: str, destination: str, timeout: float) -> ReloadOutcome:
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "SKM_RENDER_NAME": name,
           "SKM_RENDER_DESTINATION": destination}
    try:
        proc = await asyncio.create_subprocess_exec(*a.argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, env=env,
                                                    start_new_session=True)
    except OSError as e:
        return ReloadOutcome("command", "failed", f"cannot start {a.argv[0]} ({e.strerror})")
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return ReloadOutcome("command", "failed", f"{a.argv[0]} took longer than {timeout:g}s; killed")
    return ReloadOutcome("command", "ok" if rc == 0 else "failed", f"exit status {rc}")


async def _post(a: ReloadAction, name: str, destination: str, timeout: float) -> ReloadOutcome:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(a.url, json={"name": name, "destination": destination},
                              allow_redirects=False) as r:
                await r.read()
                return ReloadOutcome("post", "ok" if 200 <= r.status < 300 else "failed", f"HTTP {r.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return ReloadOutcome("post", "failed", f"{a.url} did not answer ({type(e).__name__})")
