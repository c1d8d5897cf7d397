"""`skm keystore create|list|show|update|delete`. A key store is named by its id or its name."""
from __future__ import annotations

import argparse

from server.cli.common import (CliError, Col, add_connection_args, add_yes_arg, client, confirm, listing, output,
                               resolve_store, resolve_store_id, yn)

# Short labels (the flags that set them) so the id and the checks fit 80 columns; --json has the API names.
COLUMNS = [Col("keyStoreId", "keyStoreId", keep=True), Col("name", "name", wrap=True), Col("ip4AuthUse", "ip"),
           Col("macAuthUse", "mac"), Col("certificateAuthUse", "cert"), Col("authMode", "mode"),
           Col("macVerification", "mac-verification"), Col("approvalRequired", "approval")]
API_FLAGS = {"ip4AuthUse": "--ip", "macAuthUse": "--mac", "certificateAuthUse": "--cert", "authMode": "--mode",
             "macVerification": "--mac-verification", "approvalRequired": "--approval",
             "approvalsNeeded": "--approvals-needed"}


def register(sub) -> None:
    p = sub.add_parser("keystore", help="manage key stores",
                       description="Create, list, show, update and delete key stores.")
    s = p.add_subparsers(dest="keystore_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a key store", description="Create a key store. At least one client "
                     "check (--ip, --mac, --cert) must be enabled.")
    c.add_argument("name")
    c.add_argument("--description", default="")
    _auth_flags(c)
    c.add_argument("--appkey", help="project appkey (default: the first project)")
    add_connection_args(c)
    c.set_defaults(func=_create, api_flags=API_FLAGS)

    ls = s.add_parser("list", help="list key stores", description="List every key store.")
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    sh = s.add_parser("show", help="show one key store and its appkey",
                      description="Show one key store's settings and the appkey of its project (the appkey is "
                                  "part of every client-API URL).")
    sh.add_argument("id", metavar="KEYSTORE", help="key store id or name")
    add_connection_args(sh)
    sh.set_defaults(func=_show, api_flags=API_FLAGS)

    u = s.add_parser("update", help="change a key store's settings",
                     description="Change settings; on an approval store this creates a change request.")
    u.add_argument("id", metavar="KEYSTORE", help="key store id or name")
    u.add_argument("--name")
    u.add_argument("--description")
    _auth_flags(u, update=True)
    add_connection_args(u)
    u.set_defaults(func=_update, api_flags=API_FLAGS)

    d = s.add_parser("delete", help="delete an empty key store (asks first)",
                     description="Delete a key store with its client authentication data and change requests. "
                                 "Refused while it holds keys (delete them first); on an approval store this "
                                 "creates a change request. Asks for confirmation on a terminal; --yes in scripts.")
    d.add_argument("id", metavar="KEYSTORE", help="key store id or name")
    add_yes_arg(d)
    add_connection_args(d)
    d.set_defaults(func=_delete, api_flags=API_FLAGS)


def _auth_flags(p: argparse.ArgumentParser, update: bool = False) -> None:
    bool_default = None if update else False
    for flag, help_ in (("ip", "IPv4/CIDR check"), ("mac", "MAC address check"), ("cert", "client certificate check")):
        p.add_argument(f"--{flag}", dest=flag, action=argparse.BooleanOptionalAction, default=bool_default,
                       help=f"enable the {help_}")
    p.add_argument("--mode", type=str.upper, choices=["AND", "OR"], default=None if update else "AND",
                   help="pass all enabled checks (AND) or any one (OR)")
    p.add_argument("--mac-verification", type=str.lower, choices=["header", "attested", "neighbor"],
                   default=None if update else "attested",
                   help="how a MAC claim is verified (header is NHN-compatible and weak)")
    p.add_argument("--approval", action=argparse.BooleanOptionalAction, default=None if update else False,
                   help="require an approver for every change")
    p.add_argument("--approvals-needed", type=int, default=None if update else 1)


def _body(args: argparse.Namespace) -> dict:
    body = {"ip4AuthUse": args.ip, "macAuthUse": args.mac, "certificateAuthUse": args.cert, "authMode": args.mode,
            "macVerification": args.mac_verification, "approvalRequired": args.approval,
            "approvalsNeeded": args.approvals_needed}
    for k in ("ip4AuthUse", "macAuthUse", "certificateAuthUse"):
        if body[k] is not None:
            body[k] = yn(body[k])
    return {k: v for k, v in body.items() if v is not None}


async def _create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "description": args.description, **_body(args)}
    if args.appkey:
        body["appkey"] = args.appkey
    async with client(args) as c:
        out = await c.call("POST", "/keystores", body)
    output(args, out, title="key store created")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/keystores")
    listing(args, out, COLUMNS, out["keyStoreList"], title="key stores")
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await resolve_store(c, args.id)
        if "appkey" not in out:            # by name: the list has no appkey; the store itself does
            out = await c.call("GET", f"/keystores/{out['keyStoreId']}")
    output(args, out, title=f"key store {out['keyStoreId']}")
    return 0


async def _update(args: argparse.Namespace) -> int:
    body = _body(args)
    if args.name:
        body["name"] = args.name
    if args.description is not None:
        body["description"] = args.description
    if not body:
        raise CliError("nothing to change: give at least one setting (see `skm keystore update --help`)")
    async with client(args) as c:
        store = await resolve_store_id(c, args.id)
        out = await c.call("PATCH", f"/keystores/{store}", body)
    output(args, out, title="key store updated")
    return 0


async def _delete(args: argparse.Namespace) -> int:
    async with client(args) as c:
        store = await resolve_store(c, args.id)
        confirm(args, f"deleting key store {store['name']!r} ({store['keyStoreId']}) with its authentication data")
        out = await c.call("DELETE", f"/keystores/{store['keyStoreId']}")
    output(args, out, title="key store deleted")
    return 0
