"""`skm run`: start a program with secrets in its environment, read through the local sidecar.

    skm run --sidecar /run/skm/sidecar.sock --env DB_PASSWORD=payments/db-password -- psql -h db app

Values come over the sidecar's Unix socket (no credential, nothing on the command line, nothing
on disk) and the program is `exec`ed with them added to the environment. With
`--restart-on-change`, `skm run` stays as the program's supervisor: it waits on the sidecar's
change feed (`GET /v1/watch`, no reads while nothing changes), and when a value it passed really
changed it stops the program (SIGTERM, then SIGKILL after --grace) and starts it again with the
new values. It forwards the signals it gets to the program and exits with the program's status.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys

from server import child_environ
from server.errors import Forbidden, InvalidRequest, NotFound, Unavailable
from sidecar.keyref import KeyRef, KeyUnavailable, Resolver, parse_body

DEFAULT_SOCKET = "/run/skm/sidecar.sock"
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
WATCH_SECONDS = 30.0


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run a program with secrets in its environment, read through the local sidecar",
        description="Read secrets through the sidecar's Unix socket and start PROGRAM with them as environment "
                    "variables: nothing on its command line, nothing on disk. A key is named by its id or as "
                    "store-name/key-name. With --restart-on-change, skm run stays as PROGRAM's supervisor and "
                    "restarts it when a value changes (rotation, update), forwards signals to it and exits "
                    "with its status.",
        epilog="example: skm run --env DB_PASSWORD=payments/db-password -- psql -h db -U app app")
    p.add_argument("--sidecar", metavar="SOCKET",
                   default=os.environ.get("SKM_SIDECAR_LISTEN_SOCKET", DEFAULT_SOCKET),
                   help=f"the sidecar's socket (default: SKM_SIDECAR_LISTEN_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--env", "-e", action="append", metavar="NAME=KEY", required=True,
                   help="put the SECRET named KEY (key id, or store-name/key-name) in variable NAME; repeat")
    p.add_argument("--restart-on-change", action="store_true",
                   help="stay as supervisor and restart PROGRAM when one of its values changes")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="how long a program being restarted may take to exit after SIGTERM (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]",
                   help="the program to run and its arguments")
    p.set_defaults(func=_run)


def parse_env(specs: list[str]) -> list[tuple[str, KeyRef]]:
    out: list[tuple[str, KeyRef]] = []
    for spec in specs:
        name, sep, ref = spec.partition("=")
        if not sep or not _VAR.fullmatch(name):
            raise InvalidRequest(f"--env {spec!r}: write NAME=KEY, NAME a variable name (letters, digits, _)")
        try:
            out.append((name, KeyRef.parse(ref)))
        except ValueError as e:
            raise InvalidRequest(f"--env {name}: {e}") from None
        if [n for n, _ in out].count(name) > 1:
            raise InvalidRequest(f"--env {name} is given twice")
    return out


class SidecarSocket:
    """The few calls skm run makes to the sidecar, over its Unix socket."""

    def __init__(self, path: str) -> None:
        import aiohttp               # here: every other command builds this module's parser too
        self.path = path
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=WATCH_SECONDS + 15))
        self.resolver = Resolver(self.get, ttl=0)      # names looked up afresh on every read

    async def close(self) -> None:
        await self.session.close()

    async def get(self, suffix: str, query: str = "") -> tuple[int, dict]:
        import aiohttp
        url = f"http://sidecar{suffix}" + (f"?{query}" if query else "")
        try:
            async with self.session.get(url, headers={"Accept": "application/json"}) as r:
                return r.status, parse_body(await r.read())
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            why = getattr(getattr(e, "os_error", None), "strerror", None) or type(e).__name__
            raise Unavailable(f"cannot reach the sidecar at {self.path} ({why}); is it running, and is "
                              "--sidecar right?") from None

    async def values(self, specs: list[tuple[str, KeyRef]]) -> tuple[dict[str, str], dict[str, str]]:
        """(variable -> value, variable -> key id)."""
        values, ids = {}, {}
        for name, ref in specs:
            try:
                kid = await self.resolver.key_id(ref)
                status, body = await self.get(f"/secrets/{kid}")
            except KeyUnavailable as e:
                raise _error(name, e.status or (404 if e.definitive else None), str(e)) from None
            if status != 200:
                msg = (body.get("header") or {}).get("resultMessage") or f"HTTP {status}"
                raise _error(name, status, f"{ref.text}: {msg}")
            value = (body.get("body") or {}).get("secret")
            if not isinstance(value, str):
                raise Unavailable(f"--env {name}: the sidecar returned no secret for {ref.text}")
            values[name], ids[name] = value, kid
        return values, ids

    async def watch(self, keys: list[str], since: int | None) -> dict:
        query = "" if since is None else "&".join([*(f"key={k}" for k in sorted(set(keys))), f"since={since}",
                                                   f"timeout={WATCH_SECONDS:g}"])
        status, body = await self.get("/v1/watch", query)
        if status != 200 or "seq" not in body:
            raise Unavailable(f"the sidecar at {self.path} has no change feed (HTTP {status}); update it")
        return body


def _error(name: str, status: int | None, text: str):
    if status in (401, 403):
        return Forbidden(f"--env {name}: {text}")
    if status is not None and 400 <= status < 500:
        return NotFound(f"--env {name}: {text}")
    return Unavailable(f"--env {name}: {text}")


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InvalidRequest("name the program to run after --, e.g. skm run --env X=store/key -- myprogram")
    return cmd


def _run(args: argparse.Namespace) -> int:
    specs = parse_env(args.env)
    cmd = _command(args)
    if args.restart_on_change:
        return asyncio.run(Supervisor(cmd, specs, args.sidecar, args.grace).run())

    async def fetch() -> dict[str, str]:
        s = SidecarSocket(args.sidecar)
        try:
            return (await s.values(specs))[0]
        finally:
            await s.close()

    env = {**child_environ(), **asyncio.run(fetch())}
    try:
        os.execvpe(cmd[0], cmd, env)           # replaces this process: the program holds the values, nothing else
    except FileNotFoundError:
        print(f"error: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"error: {cmd[0]}: permission denied", file=sys.stderr)
        return 126
    return 1                                    # not reached


def exit_status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


class Supervisor:
    def __init__(self, cmd: list[str], specs: list[tuple[str, KeyRef]], socket: str, grace: float) -> None:
        self.cmd = cmd
        self.specs = specs
        self.socket = socket
        self.sock: SidecarSocket | None = None     # made in run(): a connector needs the running loop
        self.grace = grace
        self.values: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        self.child: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.changed = asyncio.Event()
        self.changed_names: list[str] = []

    def say(self, text: str) -> None:
        print(f"skm run: {text}", file=sys.stderr, flush=True)

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(*self.cmd, env={**child_environ(), **self.values})
        except FileNotFoundError:
            raise NotFound(f"{self.cmd[0]}: command not found") from None
        except PermissionError:
            raise Forbidden(f"{self.cmd[0]}: permission denied") from None

    def _forward(self, sig: signal.Signals) -> None:
        if sig in STOPPING:
            self.stopping = True
        if self.child is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.sock = SidecarSocket(self.socket)
        try:
            seq = (await self.sock.watch([], None))["seq"]      # before reading: a change after it is seen
            self.values, self.ids = await self.sock.values(self.specs)
            self.child = await self._spawn()
            for sig in FORWARDED:
                loop.add_signal_handler(sig, self._forward, sig)
            watcher = asyncio.create_task(self._watch(seq), name="skm-run-watch")
            try:
                return await self._supervise()
            finally:
                watcher.cancel()
                with contextlib.suppress(BaseException):
                    await watcher
                for sig in FORWARDED:
                    loop.remove_signal_handler(sig)
        finally:
            await self.sock.close()

    async def _supervise(self) -> int:
        while True:
            assert self.child is not None
            exited = asyncio.ensure_future(self.child.wait())
            change = asyncio.ensure_future(self.changed.wait())
            await asyncio.wait({exited, change}, return_when=asyncio.FIRST_COMPLETED)
            change.cancel()
            if exited.done() or self.stopping:
                rc = await exited
                return exit_status(rc)
            exited.cancel()
            self.changed.clear()
            await self._restart()

    async def _restart(self) -> None:
        old = self.child
        assert old is not None
        with contextlib.suppress(ProcessLookupError):
            old.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(old.wait(), self.grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                old.kill()
            await old.wait()
        if self.stopping:
            return
        self.child = await self._spawn()
        self.say(f"{', '.join(self.changed_names)} changed; restarted {self.cmd[0]} "
                 f"(pid {old.pid} -> {self.child.pid})")

    async def _watch(self, seq: int) -> None:
        delay = 0.5
        while True:
            try:
                r = await self.sock.watch(list(self.ids.values()), seq)
                seq = int(r["seq"])
                delay = 0.5
                if not (r.get("changed") or r.get("all") or r.get("stream") != "connected"):
                    continue
                values, ids = await self.sock.values(self.specs)
            except asyncio.CancelledError:
                raise
            except Exception as e:                  # the sidecar restarting, a key refused: keep the program
                self.say(f"cannot check for changes ({e}); retrying in {delay:g}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_SECONDS)
                with contextlib.suppress(Exception):
                    seq = int((await self.sock.watch([], None))["seq"])
                    values, ids = await self.sock.values(self.specs)
                    self._compare(values, ids)
                continue
            self._compare(values, ids)

    def _compare(self, values: dict[str, str], ids: dict[str, str]) -> None:
        names = [n for n in values if values[n] != self.values.get(n)]
        self.ids = ids
        if names:
            self.values = values
            self.changed_names = names
            self.changed.set()
