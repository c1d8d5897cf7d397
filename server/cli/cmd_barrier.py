"""`skm barrier status|refresh|rewrap|retire`: system-key versions of a running key server.

All of it goes through the management API (/api/v1/system/...): the key server
does the work online, the CLI starts it and follows its progress.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from server.cli.common import add_connection_args, client, output

POLL_SECONDS = 0.2


def register(sub) -> None:
    p = sub.add_parser("barrier", help="system-key versions, refresh, rewrap and retire",
                       description="Inspect and rotate the barrier (the system-key encryption of every stored "
                                   "record) of a running key server.")
    s = p.add_subparsers(dest="barrier_command", metavar="SUBCOMMAND")
    s.required = True

    st = s.add_parser("status", help="sealed or not, system-key versions and records per version",
                      description="Show the barrier: current system-key version, the versions held, and how many "
                                  "records are sealed under each.")
    add_connection_args(st)
    st.set_defaults(func=_status)

    rf = s.add_parser("refresh", help="fetch the keyring again and seal new writes with its current version",
                      description="Pick up a version added by `skm systemkey rotate` without a restart.")
    add_connection_args(rf)
    rf.set_defaults(func=_refresh)

    rw = s.add_parser("rewrap", help="re-seal every record under the current system-key version",
                      description="Start the online rewrap on the key server and follow it with a progress bar. "
                                  "Reads and writes keep working meanwhile.")
    rw.add_argument("--batch", type=int, default=200, help="records per transaction (default 200)")
    rw.add_argument("--no-wait", action="store_true", help="start the job and return")
    add_connection_args(rw)
    rw.set_defaults(func=_rewrap)

    rt = s.add_parser("retire", help="drop a system-key version that no record uses",
                      description="Retire a version on the key server once `skm barrier status` shows no record "
                                  "on it (and `skm systemkey retire` it on the system-key host).")
    rt.add_argument("version", type=int)
    add_connection_args(rt)
    rt.set_defaults(func=_retire)


async def _status(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/system/status")
    if args.json:
        output(args, out)
        return 0
    output(args, {"sealed": out["sealed"], "current version": out["currentVersion"],
                  "versions held": ", ".join(map(str, out["versions"])),
                  "rewrap": _job_line(out["rewrap"])}, title="barrier")
    rows = [{"version": v, "records": n, "": "current" if int(v) == out["currentVersion"] else ""}
            for v, n in out["recordsByVersion"].items()]
    output(args, out, ["version", "records", ""], rows, title="records by system-key version")
    return 0


def _job_line(job: dict) -> str:
    if job["state"] == "idle":
        return "none since start"
    line = f"{job['state']}: {job['done']}/{job['total']} to version {job['targetVersion']}"
    return line + (f" ({job['error']})" if job.get("error") else "")


async def _refresh(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", "/system/keyring/refresh")
    output(args, out, title="keyring refreshed")
    return 0


async def _retire(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", f"/system/keyring/retire/{args.version}")
    output(args, out, title="system-key version retired")
    return 0


async def _rewrap(args: argparse.Namespace) -> int:
    async with client(args) as c:
        job = await c.call("POST", "/system/rewrap", {"batch": args.batch})
        if not args.no_wait:
            job = await _follow(c, job, quiet=args.json)
    if args.json:
        output(args, job)
    elif job["state"] == "done":
        print(f"rewrap done: {job['done']} record(s) now on system-key version {job['targetVersion']} "
              f"in {job['seconds']} s")
    elif job["state"] == "running":
        print("rewrap started; follow it with `skm barrier status`")
    if job["state"] == "failed":
        print(f"error: rewrap failed: {job.get('error')}", file=sys.stderr)
        return 1
    return 0


async def _follow(c, job: dict, *, quiet: bool) -> dict:
    """Poll the job until it ends, drawing a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True, quiet=quiet)
    with Progress(TextColumn("re-sealing under version {task.fields[target]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("rewrap", total=max(job["total"], 1), target=job["targetVersion"])
        while job["state"] == "running":
            await asyncio.sleep(POLL_SECONDS)
            job = await c.call("GET", "/system/rewrap")
            bar.update(task, total=max(job["total"], 1), completed=job["done"])
        if job["state"] == "done":
            bar.update(task, total=max(job["total"], job["done"], 1), completed=max(job["total"], job["done"], 1))
    return job
