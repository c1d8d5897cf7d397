"""`skm approval list|show|approve|deny|cancel|collect`: change requests (key stores, operator management)."""
from __future__ import annotations

import argparse
import json

from server.cli.common import Col, add_connection_args, client, listing, output

COLUMNS = [Col("changeRequestId", "id", keep=True), Col("keyStoreId", "keyStoreId", keep=True),
           Col("operation", "operation", keep=True), Col("status", "status", rank=3),
           Col("requestedBy", "requestedBy", wrap=True, rank=4), Col("approvals", "approvals", wrap=True, rank=6),
           Col("approvalsNeeded", "needed", rank=5), Col("creationDatetime", "created", rank=7),
           Col("expirationDatetime", "expires", rank=8)]


def register(sub) -> None:
    p = sub.add_parser("approval", help="review change requests",
                       description="List, show, approve, deny and cancel change requests of approval key stores.")
    s = p.add_subparsers(dest="approval_command", metavar="SUBCOMMAND")
    s.required = True

    ls = s.add_parser("list", help="list change requests", description="List change requests (newest first).")
    ls.add_argument("--status", choices=["PENDING", "APPROVED", "APPLIED", "FAILED", "DENIED", "CANCELLED",
                                         "EXPIRED"], type=str.upper)
    ls.add_argument("--keystore", type=int, help="key store id")
    ls.add_argument("--requested-by", help="operator name")
    ls.add_argument("--limit", type=int, default=100)
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    sh = s.add_parser("show", help="show a change request and what it changes",
                      description="Show one change request with its diff (secret values masked).")
    sh.add_argument("id", type=int)
    add_connection_args(sh)
    sh.set_defaults(func=_show)

    for name, help_, path in (("approve", "approve (approver role; never your own request)", "approve"),
                              ("deny", "deny (approver role)", "deny")):
        sp = s.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        sp.add_argument("id", type=int)
        sp.add_argument("--comment", default="", help="a note (deny: the reason)")
        add_connection_args(sp)
        sp.set_defaults(func=_decide, path=path)

    c = s.add_parser("cancel", help="cancel your own pending request", description="Cancel your own change request.")
    c.add_argument("id", type=int)
    add_connection_args(c)
    c.set_defaults(func=_decide, path="cancel")

    co = s.add_parser("collect", help="take the credential your applied request made (once)",
                      description="Print, once, the token or access key secret an applied operator management "
                      "request (a credential for someone else) made. Only the requester can collect it.")
    co.add_argument("id", type=int)
    add_connection_args(co)
    co.set_defaults(func=_collect)


def _row(cr: dict) -> dict:
    return {**cr, "approvals": ", ".join(a["operator"] for a in cr["approvals"]) or "-"}


async def _list(args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.status:
        params["status"] = args.status
    if args.keystore is not None:
        params["keyStoreId"] = str(args.keystore)
    if args.requested_by:
        params["requestedBy"] = args.requested_by
    async with client(args) as c:
        out = await c.call("GET", "/approvals", params=params)
    listing(args, out, COLUMNS, [_row(r) for r in out["changeRequests"]], title="change requests")
    return 0


def _print(args: argparse.Namespace, cr: dict, title: str) -> None:
    if args.json:
        output(args, cr)
        return
    summary = {k: v for k, v in _row(cr).items() if k not in ("diff",)}
    output(args, summary, title=title)
    rows = [{"field": c["field"], "from": json.dumps(c.get("from")), "to": json.dumps(c.get("to"))}
            for c in cr["diff"].get("changes", [])]
    output(args, None, ["field", "from", "to"], rows,
           title=f"{cr['diff'].get('operation')} on {json.dumps(cr['diff'].get('target'))}")


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", f"/approvals/{args.id}")
    _print(args, out, f"change request {args.id}")
    return 0


async def _decide(args: argparse.Namespace) -> int:
    body = {"comment": args.comment} if args.path in ("approve", "deny") and args.comment else None
    async with client(args) as c:
        out = await c.call("POST", f"/approvals/{args.id}/{args.path}", body)
    _print(args, out, f"change request {args.id}: {out['status']}")
    return 0 if out["status"] != "FAILED" else 1


async def _collect(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", f"/approvals/{args.id}/collect")
    output(args, {k: v for k, v in out.items() if v is not None}, title=f"change request {args.id}: collected "
           "(shown once)")
    return 0
