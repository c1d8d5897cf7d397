"""`skm audit query|verify|export|pubkey`: the keyed, checkpointed audit log (docs/audit.md).

`verify` checks, through the management API, every record's digest and keyed tag and the signed
checkpoints; `--data-dir/--config` reads a database directly and, when this host can reach the root
key and the system key the way the server does at start, checks exactly what the live verify checks
(otherwise digests only, and it says so with exit 8, never "intact"); `--offline EXPORT --pubkey PEM`
checks an export anywhere with only the checkpoint public key. `export` writes the records and then
the signed checkpoints as JSON lines.

Exit codes of `verify`: 0 intact, 1 broken (a bad record, or the checkpoint log missing), 8 not
verified (tags or checkpoints could not be checked; the message says how to check them).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from server.cli.common import Col, add_connection_args, client, listing, output

# Never cut: the record's seq, its action and the key id. Time and free text wrap; on a narrow terminal
# the reason, names and actor go first (`rank`, highest first), then the time, the result last.
COLUMNS = [Col("seq", "seq", keep=True), Col("time", "time (UTC)", wrap=True, min=10, rank=5),
           Col("actor", "actor", wrap=True, rank=6), Col("action", "action", keep=True),
           Col("keyStore", "keyStore", wrap=True, rank=8), Col("keyId", "keyId", keep=True),
           Col("key", "key", wrap=True, rank=7), Col("result", "result", rank=4),
           Col("reason", "reason", wrap=True, rank=9)]
PAGE = 1000
UNVERIFIED = 8          # `verify`: not broken, but not everything could be checked (never "intact")


def register(sub) -> None:
    p = sub.add_parser("audit", help="query, verify and export the audit log",
                       description="The audit log: every request and decision, each record chained to the "
                       "previous one, tagged with a key only the server holds, and pinned by signed checkpoints "
                       "kept outside the database.")
    s = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    s.required = True

    q = s.add_parser("query", help="query records with filters (newest first)",
                     description="Query audit records, newest first (--oldest-first to reverse). Key and key "
                     "store names are shown beside their ids.")
    _filters(q)
    q.add_argument("--limit", type=int, default=100, help="at most this many records (max 1000)")
    q.add_argument("--oldest-first", action="store_true", help="oldest records first")
    add_connection_args(q)
    q.set_defaults(func=_query)

    v = s.add_parser("verify", help="check the keyed chain and the signed checkpoints",
                     description="Check every record's digest and keyed tag and the signed checkpoints (a log "
                     "that ends before a checkpoint was truncated or replaced by an older copy; a missing or "
                     "emptied checkpoint log is reported too). Exit 0 when intact, 1 when broken (naming the "
                     "first bad record), 8 when it could not all be checked (tags or checkpoints; the message "
                     "says how). --data-dir/--config read a database directly and check tags and checkpoints "
                     "when the root key and system key are reachable as the server reaches them at start "
                     "(digests only otherwise: exit 8); --offline EXPORT --pubkey PEM checks an export with "
                     "only the checkpoint public key (`skm audit pubkey`).")
    _offline(v)
    v.add_argument("--offline", metavar="EXPORT", help="an export written by `skm audit export` to verify")
    v.add_argument("--pubkey", metavar="PEM", help="with --offline: the checkpoint public key file")
    add_connection_args(v)
    v.set_defaults(func=_verify)

    e = s.add_parser("export", help="write records (and the signed checkpoints) as JSON lines",
                     description="Write audit records as JSON lines (one record per line), oldest first, to "
                     "standard output or --output, followed by the signed checkpoints of the chain (lines with a "
                     "\"checkpoint\" field), so `skm audit verify --offline` can check it anywhere. Online, or "
                     "offline with --data-dir/--config (records only).")
    _filters(e)
    e.add_argument("--output", "-o", help="file to write (default: standard output)")
    _offline(e)
    add_connection_args(e)
    e.set_defaults(func=_export)

    k = s.add_parser("pubkey", help="print the checkpoint public key (PEM)",
                     description="Print the public key the server signs audit checkpoints with. Keep a copy "
                     "where the database's owner cannot change it; `skm audit verify --offline` takes it.")
    add_connection_args(k)
    k.set_defaults(func=_pubkey)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="from this time (ISO 8601, UTC unless a zone is given)")
    p.add_argument("--until", help="before this time")
    p.add_argument("--actor", help="operator name or client caller")
    p.add_argument("--plane", choices=["data", "mgmt", "system", "sidecar"])
    p.add_argument("--key", dest="key_id", help="key id")
    p.add_argument("--keystore", type=int, help="key store id")
    p.add_argument("--result", choices=["ok", "denied", "refused", "error", "approval_required"])
    p.add_argument("--action", help="an action (secret.read, key.create, keystore.update, operator.login, "
                   "key.reveal, approval.applied ...) or a resource (key, secret, operator) for all of its actions")
    p.add_argument("--changes", action="store_true", help="only requests that changed something (writes)")


def _offline(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offline (read the database directly instead of the API)")
    g.add_argument("--data-dir", help="the key server's data dir (SQLite database inside)")
    g.add_argument("--config", help="the key server's config file (its storage setting is used)")


def _params(args: argparse.Namespace) -> dict:
    out = {"since": args.since, "until": args.until, "actor": args.actor, "plane": args.plane, "keyId": args.key_id,
           "keyStoreId": None if args.keystore is None else str(args.keystore), "result": args.result,
           "action": args.action, "changes": "true" if getattr(args, "changes", False) else None}
    return {k: v for k, v in out.items() if v is not None}


def _config(args: argparse.Namespace):
    from server.config import load
    from server.settings import ServerConfig
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    return load(ServerConfig, args.config, overrides=overrides)


@asynccontextmanager
async def _database(args: argparse.Namespace, cfg=None):
    from server.storage.factory import open_storage
    cfg = cfg or _config(args)
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
    if args.action:
        from server.audit.actions import check_filter
        from server.cli.common import CliError
        refused = check_filter(args.action)        # said here, before any connection (the server says it too)
        if refused:
            raise CliError(refused)
    params = {**_params(args), "limit": str(max(1, min(args.limit, 1000))),
              "order": "asc" if args.oldest_first else "desc"}
    async with client(args) as c:
        out = await c.call("GET", "/audit", params=params)
    rows = [{**r, "time": _time(r.get("time")),
             "keyStore": _named(r.get("detail", {}).get("keyStoreName"), r.get("keyStoreId")),
             "key": r.get("detail", {}).get("keyName")} for r in out["records"]]
    listing(args, out, COLUMNS, rows, title="audit records")
    return 0


def _time(at: str | None) -> str | None:
    """`2026-01-02 03:04:05` (UTC, as stored) for the table: to the second, with a space where a narrow
    column wraps."""
    if not at:
        return at
    return at.replace("T", " ", 1)[:19]


def _named(name: str | None, ident) -> str | None:
    if ident is None:
        return name
    return f"{name} ({ident})" if name else str(ident)


async def _verify(args: argparse.Namespace) -> int:
    if args.offline or args.pubkey:
        if not (args.offline and args.pubkey):
            from server.errors import InvalidRequest
            raise InvalidRequest("--offline EXPORT and --pubkey PEM go together (get the key with `skm audit pubkey`)")
        from server.audit.offline import verify_export
        result = (await verify_export(Path(args.offline), Path(args.pubkey))).to_api()
    elif _offline_mode(args):
        result = await _verify_database(args)
    else:
        async with client(args) as c:
            result = await c.call("GET", "/audit/verify")
    if args.json:
        output(args, result)
    else:
        _print_verify(result)
    return _exit(result)


def _status(result: dict) -> str:
    return result.get("status") or ("intact" if result["ok"] else "broken")    # a server before `status`


def _exit(result: dict) -> int:
    return {"intact": 0, "unverified": UNVERIFIED}.get(_status(result), 1)


async def _verify_database(args: argparse.Namespace) -> dict:
    """The database read directly. With the root key and the system key at hand (fetched exactly as the
    server does at start: file root key or PKCS#11, local keyring or the system-key server) the same
    check as the live verify: tags and the checkpoints from the configured sinks. Without them only
    digests, reported as not verified."""
    from server.audit import verify_chain
    from server.audit.checkpoints import sinks_for
    from server.audit.log import read_link_key, verify_database
    from server.backup.keys import unsealed_barrier
    from server.settings import AuditSettings
    cfg = _config(args)
    async with _database(args, cfg) as db, AsyncExitStack() as stack:
        try:
            barrier = await stack.enter_async_context(unsealed_barrier(cfg))
        except Exception as e:      # noqa: BLE001 - any way of failing to unseal ends in the same answer
            barrier, why = None, (str(e) if _ours(e) else type(e).__name__)
        if barrier is not None:
            key = await read_link_key(db, barrier)
            sinks = sinks_for(cfg, AuditSettings.from_config(cfg))
            res = await verify_database(db, barrier, key, sinks)
            if key is None and int(res.head_seq):
                res.cannot_check("this chain has no audit key yet, so no tags could be checked")
            if not res.ok and res.broken_seq is None:
                # A missing checkpoint log may only mean this config is not the server's: show where we looked.
                res.warnings.append("checkpoints were looked for in " + ", ".join(_where(s) for s in sinks)
                                    + "; if the server is configured otherwise, pass its --config")
            return res.to_api()
        res = await verify_chain(db)
        res.cannot_check(f"only digests were checked: the tags and checkpoints were NOT checked, because the root "
                         f"key or the system key could not be reached with this config ({why}). Check them with "
                         "`skm audit verify` against the running server, or run this where the root key (file or "
                         "HSM) and the system key (its file or the system-key server) are reachable")
        return res.to_api()


def _where(sink) -> str:
    if sink.name == "file":
        return f"the file {sink.path}"
    if sink.name == "systemkey":
        return "the system-key server " + " ".join(sink.urls)
    return f"the {sink.name} (write-only)"


def _ours(e: BaseException) -> bool:
    """Our own errors say what went wrong without values; anything else is named by its type only."""
    from server.errors import SKMError
    return isinstance(e, SKMError)


def _print_verify(result: dict) -> None:
    status = _status(result)
    if status == "intact":
        how = "digests and keyed tags" if result.get("keyed") else "digests"
        print(f"audit chain intact: {result['checked']} record(s), head {result['headSeq']} ({how} checked)")
    elif status == "unverified":
        print(f"audit chain NOT VERIFIED: {result['reason']} ({result['checked']} record(s) read, head "
              f"{result['headSeq']}; nothing found wrong in what could be checked)")
    elif result.get("brokenSeq") is None:
        print(f"audit chain NOT INTACT: {result['reason']}")
    else:
        print(f"audit chain BROKEN at record {result['brokenSeq']}: {result['reason']} "
              f"({result['checked']} record(s) before it are intact)")
    cp = result.get("checkpoints")
    if cp is not None:
        if cp.get("latestSeq") is not None:
            print(f"checkpoints: {cp['checked']} signed, the latest at record {cp['latestSeq']} ({cp['latestAt']}); "
                  f"{cp['uncovered']} record(s) after it; read from {', '.join(cp['sources']) or 'nowhere'}")
        else:
            print(f"checkpoints: none found (read from {', '.join(cp['sources']) or 'nowhere'})")
        for u in cp.get("unreadable") or []:
            print(f"checkpoints: could not read {u}")
    for w in result.get("warnings") or []:
        print(f"warning: {w}")


async def _pubkey(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/audit/pubkey")
    if args.json:
        output(args, out)
    else:
        sys.stdout.write(out["publicKey"])
    return 0


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
                break
            after = page["nextAfterSeq"]
        cps = await c.call("GET", "/audit/checkpoints")
        for entry in cps["checkpoints"]:
            yield entry


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
                                     changes=bool(args.changes), after_seq=after, limit=PAGE)
            for rec in page:
                yield rec
            if len(page) < PAGE:
                return
            after = page[-1]["seq"]
