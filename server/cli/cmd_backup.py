"""`skm backup create|verify|restore`: online backups and verified restores (docs/disaster-recovery.md).

`create` asks a running key server (management API, admin token) for a backup and writes the
stream to a file. `verify` and `restore` run offline on the host, with the key server's config:
they need its system key (root key file or HSM, local keyring or system-key server), fetched the
way `skm server run` fetches it, to check the file's MAC and open a sample of its records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from server.cli.common import add_connection_args, connection, output


def register(sub) -> None:
    p = sub.add_parser("backup", help="online backup, verify, restore (also SQLite -> PostgreSQL)",
                       description="Backups of the whole store: every record still sealed under the system key, a "
                                   "manifest, and a MAC over the file. See docs/disaster-recovery.md.")
    s = p.add_subparsers(dest="backup_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="stream an online backup from a running key server to a file",
                     description="Ask the key server (admin token) for a consistent online backup; it keeps serving "
                                 "reads and writes meanwhile. Written to FILE.partial and renamed once complete.")
    c.add_argument("--out", "-o", required=True, help="file to write (created 0600; must not exist)")
    add_connection_args(c)
    c.set_defaults(func=_create)

    v = s.add_parser("verify", help="check a backup file offline: structure, manifest, MAC, sample records",
                     description="Check FILE without writing anything: its structure and manifest, the MAC over the "
                                 "whole file (a changed byte, a truncation or a spliced row is refused) and that a "
                                 "sample of its sealed records opens under the system key. Runs offline with the "
                                 "key server's config (--config / --data-dir), which says where the root key and the "
                                 "system key are. Exit 0 when usable, 1 otherwise.")
    v.add_argument("file", help="the backup file")
    _key_args(v)
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_verify)

    r = s.add_parser("restore", help="restore a backup into an empty store (SQLite data dir or PostgreSQL)",
                     description="Restore FILE into an empty store: --data-dir DIR (SQLite, DIR/skm.db) or "
                                 "--storage postgresql://... The file is verified in full first; the rows are "
                                 "written in one transaction that commits only if the MAC, the counts and the audit "
                                 "chain check out. Run it offline (the key server stopped) on the target host, with "
                                 "the installation's root key and system key (--config). The same file restores "
                                 "into either backend: the way to move from SQLite to PostgreSQL.")
    r.add_argument("file", help="the backup file")
    _key_args(r)
    r.add_argument("--storage", help="target PostgreSQL URL (postgresql://user@host/db) or sqlite:///PATH "
                                     "(default: the data dir's SQLite database)")
    r.add_argument("--force", action="store_true", help="replace everything in a target that is not empty")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=_restore)


def _key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the installation (where its root key and system key are)")
    g.add_argument("--config", "-c", help="the key server's TOML config (every value also from SKM_* variables)")
    g.add_argument("--data-dir", help="the key server's data dir (default root key, keyring, SQLite database)")


def _config(args: argparse.Namespace):
    # As `skm server run` loads it (server/cli/cmd_server.py), without that module's imports.
    from server.config import load
    from server.settings import ServerConfig
    return load(ServerConfig, args.config, overrides={"data_dir": args.data_dir} if args.data_dir else {})


# ----------------------------------------------------------------------------- create
def _create(args: argparse.Namespace) -> int:
    # Synchronous, on the standard library (server/cli/backup_client.py): no asyncio, aiohttp, rich
    # (unless a bar is drawn) to import.
    from server.cli.backup_client import progress_bar, stream_backup
    from server.errors import ConfigError
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file")
    conn = connection(args)
    t0 = time.monotonic()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            with progress_bar(args.json) as update:
                summary = stream_backup(conn, f, update)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
        done = True
    finally:
        if not done:
            partial.unlink(missing_ok=True)
    summary.update(file=str(out), seconds=round(time.monotonic() - t0, 3))
    if args.json:
        output(args, summary)
    else:
        print(f"backup written: {out} ({summary['records']} records, {summary['bytes']} bytes, "
              f"{summary['seconds']} s)")
        print(f"  backup id {summary['backupId']}, made {summary['createdAt']} on {summary['backend']} "
              f"(schema {summary['schemaVersion']})")
        print(f"  audit head: record {summary['auditHead'].get('seq')}; restore needs system-key version(s) "
              f"{', '.join(map(str, summary['systemKeyVersions']))}")
        print(f"  check it: skm backup verify {out} --config <the server's config>")
    return 0


# ----------------------------------------------------------------------------- verify / restore
def _progress(json_output: bool):
    """(context, update) for the bars of verify and restore: drawn on a terminal (stderr) without --json;
    otherwise nothing drawn and rich not imported (a script's log gains nothing from a final bar)."""
    import contextlib
    if json_output or not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=console)
    tasks: dict[str, int] = {}
    # "read": bytes of a format 2 file read under its MAC; "verify" (format 1), "restore": records.
    names = {"read": ("reading", "bytes"), "verify": ("verifying", "records"), "restore": ("restoring", "records")}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            name, unit = names.get(phase, (phase, ""))
            tasks[phase] = bar.add_task(name, total=total, unit=unit)
        bar.update(tasks[phase], completed=done, total=total)
    return bar, update


async def _verify(args: argparse.Namespace) -> int:
    from server.backup.format import InvalidBackup
    from server.backup.keys import unsealed_barrier
    from server.backup.restore import verify_file
    cfg = _config(args)
    try:
        async with unsealed_barrier(cfg) as barrier:
            bar, update = _progress(args.json)
            with bar:
                report = await verify_file(args.file, barrier, progress=update)
    except InvalidBackup as e:
        if args.json:
            print(json.dumps({"ok": False, "error": e.detail}))
        else:
            print(f"backup NOT usable: {e.detail}", file=sys.stderr)
        return 1
    out = report.to_api()
    if args.json:
        output(args, out)
    else:
        sample = ", ".join(f"{n} of {k}" for k, n in out["unsealedSample"].items()) or "none to open"
        print(f"backup OK: {args.file}: {out['records']} records, {out['bytes']} bytes, made {out['createdAt']} on "
              f"{out['backend']} (schema {out['schemaVersion']})")
        print(f"  integrity ({out['macAlgorithm']} under system-key version {out['macSystemKeyVersion']}) verified; "
              f"sealed records opened: {sample}")
        print(f"  audit head: record {out['auditHead'].get('seq')}; needs system-key version(s) "
              f"{', '.join(map(str, out['systemKeyVersions']))}")
    return 0


async def _restore(args: argparse.Namespace) -> int:
    from server.backup.format import InvalidBackup
    from server.backup.keys import unsealed_barrier
    from server.backup.restore import restore
    from server.errors import ConfigError
    if not (args.data_dir or args.storage):
        raise ConfigError("name the target: --data-dir DIR (SQLite) or --storage postgresql://...")
    cfg = _config(args)
    target = args.storage or cfg.storage_url()
    try:
        async with unsealed_barrier(cfg) as barrier:
            bar, update = _progress(args.json)
            with bar:
                report = await restore(args.file, barrier, target, force=args.force, progress=update)
    except InvalidBackup as e:
        print(f"error: backup refused, nothing was restored: {e.detail}", file=sys.stderr)
        return 1
    out = report.to_api()
    if args.json:
        output(args, out)
    else:
        audit = out["audit"]
        print(f"restored {out['records']} records into {out['target']} in {out['seconds']} s "
              f"(backup {out['backupId']})")
        print(f"  counts match the manifest; audit chain intact: {audit['checked']} record(s), head "
              f"{audit['headSeq']} (checked in {out['auditSeconds']} s)")
        print(f"  audit epoch: {out['auditEpoch']}")
        print("  next: start the key server on it (skm server run ...); it needs the same root key and system key")
    return 0
