"""`skm audit query|verify|export`: the hash-chained audit log.

`verify` and `export` work against the management API, or offline with
--data-dir/--config reading the database directly (no key needed: the chain is
plain SHA-256, and records hold no values).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from server.cli.common import add_connection_args, client, output

COLUMNS = ["seq", "time", "plane", "actor", "ip", "action", "keyId", "status", "result", "reason"]
PAGE = 1000


def register(sub) -> None:
    p = sub.add_parser("audit", help="query, verify and export the audit log",
                       description="The audit log: every request and decision, each record chained to the "
                       "previous one by its SHA-256.")
    s = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    s.required = True

    q = s.add_parser("query", help="query records with filters", description="Query audit records (oldest first).")
    _filters(q)
    q.add_argument("--limit", type=int, default=100, help="at most this many records (max 1000)")
    add_connection_args(q)
    q.set_defaults(func=_query)

    v = s.add_parser("verify", help="walk the hash chain; report the first broken link",
                     description="Check every record against its hash and the one before it. Exit 0 when the "
                     "chain is intact, 1 with the first broken record otherwise. Offline with --data-dir or "
                     "--config (reads the database directly).")
    _offline(v)
    add_connection_args(v)
    v.set_defaults(func=_verify)

    e = s.add_parser("export", help="write records as JSON lines",
                     description="Write audit records as JSON lines (one record per line) to standard output or "
                     "--output. Online, or offline with --data-dir/--config.")
    _filters(e)
    e.add_argument("--output", "-o", help="file to write (default: standard output)")
    _offline(e)
    add_connection_args(e)
    e.set_defaults(func=_export)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="from this time (ISO 8601, UTC unless a zone is given)")
    p.add_argument("--until", help="before this time")
    p.add_argument("--actor", help="operator name or client caller")
    p.add_argument("--plane", choices=["data", "mgmt", "system"])
    p.add_argument("--key", dest="key_id", help="key id")
    p.add_argument("--keystore", type=int, help="key store id")
    p.add_argument("--result", choices=["ok", "denied", "refused", "error", "approval_required"])
    p.add_argument("--action", help="e.g. key.reveal, operator.login, approval.applied")


def _offline(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offline (read the database directly instead of the API)")
    g.add_argument("--data-dir", help="the key server's data dir (SQLite database inside)")
    g.add_argument("--config", help="the key server's config file (its storage setting is used)")


def _params(args: argparse.Namespace) -> dict:
    out = {"since": args.since, "until": args.until, "actor": args.actor, "plane": args.plane, "keyId": args.key_id,
           "keyStoreId": None if args.keystore is None else str(args.keystore), "result": args.result,
           "action": args.action}
    return {k: v for k, v in out.items() if v is not None}


@asynccontextmanager
async def _database(args: argparse.Namespace):
    from server.config import load
    from server.settings import ServerConfig
    from server.storage.base import open_storage
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    cfg = load(ServerConfig, args.config, overrides=overrides)
    url = cfg.storage_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        from server.errors import NotFound
        raise NotFound(f"no database at {url[len('sqlite:///'):]}; check --data-dir")
    storage = open_storage(url)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def _offline_mode(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "data_dir", None) or getattr(args, "config", None))


async def _query(args: argparse.Namespace) -> int:
    params = {**_params(args), "limit": str(max(1, min(args.limit, 1000)))}
    async with client(args) as c:
        out = await c.call("GET", "/audit", params=params)
    output(args, out, COLUMNS, out["records"], title="audit records")
    return 0


async def _verify(args: argparse.Namespace) -> int:
    if _offline_mode(args):
        from server.audit import verify_chain
        async with _database(args) as db:
            result = (await verify_chain(db)).to_api()
    else:
        async with client(args) as c:
            result = await c.call("GET", "/audit/verify")
    if args.json:
        output(args, result)
    elif result["ok"]:
        print(f"audit chain intact: {result['checked']} record(s), head {result['headSeq']}")
    else:
        print(f"audit chain BROKEN at record {result['brokenSeq']}: {result['reason']} "
              f"({result['checked']} record(s) before it are intact)")
    return 0 if result["ok"] else 1


async def _export(args: argparse.Namespace) -> int:
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    n = 0
    try:
        async for rec in (_offline_records(args) if _offline_mode(args) else _online_records(args)):
            out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"{n} record(s) written to {args.output}", file=sys.stderr)
    return 0


async def _online_records(args: argparse.Namespace):
    after = 0
    async with client(args) as c:
        while True:
            page = await c.call("GET", "/audit", params={**_params(args), "afterSeq": str(after), "limit": str(PAGE)})
            for rec in page["records"]:
                yield rec
            if page.get("nextAfterSeq") is None:
                return
            after = page["nextAfterSeq"]


async def _offline_records(args: argparse.Namespace):
    from server.audit import Audit, parse_time
    from server.barrier.barrier import Barrier
    p = _params(args)
    async with _database(args) as db:
        audit = Audit(db, Barrier())          # sealed: reading needs no key
        after = 0
        while True:
            page = await audit.query(since=parse_time(p.get("since"), "since"), until=parse_time(p.get("until"),
                                     "until"), actor=p.get("actor"), plane=p.get("plane"), key_id=p.get("keyId"),
                                     keystore_id=args.keystore, result=p.get("result"), action=p.get("action"),
                                     after_seq=after, limit=PAGE)
            for rec in page:
                yield rec
            if len(page) < PAGE:
                return
            after = page[-1]["seq"]
