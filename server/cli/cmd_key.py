"""`skm key create|list|show|rotate|delete|cancel-delete|update`."""
from __future__ import annotations

import argparse
import os
import sys

from server.cli.common import add_connection_args, client, output

COLUMNS = ["keyId", "name", "keyType", "keySpec", "keyStatus", "currentKeyValueVersion", "autoRotationPeriod",
           "deletionDatetime"]


def register(sub) -> None:
    p = sub.add_parser("key", help="manage keys", description="Create, list, rotate and delete keys.")
    s = p.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a key", description="Create a SECRET, SYMMETRIC_KEY or ASYMMETRIC_KEY. "
                     "A secret's value is read from --value-file, SKM_SECRET_VALUE or standard input, never from "
                     "an argument (arguments show in `ps`).")
    c.add_argument("keystore", type=int, help="key store id")
    c.add_argument("name")
    c.add_argument("--type", required=True, choices=["SECRET", "SYMMETRIC_KEY", "ASYMMETRIC_KEY"], dest="key_type")
    c.add_argument("--spec", help="RSA-2048 (default), RSA-3072, RSA-4096, EC-P256, EC-P384, ED25519; AES-256-GCM")
    c.add_argument("--description", default="")
    c.add_argument("--rotation-days", type=int, default=0, help="automatic rotation period (0 = off)")
    c.add_argument("--exportable", action="store_true", help="allow exporting the key material (one-way)")
    c.add_argument("--value-file", help="file holding the secret value ('-' for standard input)")
    add_connection_args(c)
    c.set_defaults(func=_create)

    ls = s.add_parser("list", help="list a key store's keys", description="List the keys of a key store.")
    ls.add_argument("keystore", type=int)
    ls.add_argument("--type", dest="key_type")
    ls.add_argument("--status", choices=["active", "inactive"])
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    for name, help_, func in (("show", "show a key and its versions", _show),
                              ("rotate", "rotate now (secrets: give the new value)", _rotate),
                              ("delete", "schedule deletion, or --now to delete a scheduled key", _delete),
                              ("cancel-delete", "cancel a scheduled deletion", _cancel)):
        sp = s.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        sp.add_argument("key_id")
        if name == "rotate":
            sp.add_argument("--value-file", help="new secret value file ('-' for standard input)")
        if name == "delete":
            sp.add_argument("--now", action="store_true", help="delete a key already scheduled for deletion")
        add_connection_args(sp)
        sp.set_defaults(func=func)

    u = s.add_parser("update", help="change description or rotation period",
                     description="Change a key's description or automatic rotation period.")
    u.add_argument("key_id")
    u.add_argument("--description")
    u.add_argument("--rotation-days", type=int)
    add_connection_args(u)
    u.set_defaults(func=_update)


def read_secret_value(path: str | None) -> str | None:
    if path == "-":
        return sys.stdin.read().rstrip("\n")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    return os.environ.get("SKM_SECRET_VALUE")


async def _create(args: argparse.Namespace) -> int:
    body = {"keyType": args.key_type, "name": args.name, "description": args.description,
            "autoRotationPeriod": args.rotation_days, "exportable": args.exportable}
    if args.spec:
        body["keySpec"] = args.spec
    if args.key_type == "SECRET":
        value = read_secret_value(args.value_file or ("-" if not sys.stdin.isatty() else None))
        if value is None:
            print("error: give the secret value with --value-file FILE, SKM_SECRET_VALUE, or on standard input",
                  file=sys.stderr)
            return 2
        body["secretValue"] = value
    async with client(args) as c:
        out = await c.call("POST", f"/keystores/{args.keystore}/keys", body)
    output(args, out, title="key created")
    return 0


async def _list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("type", args.key_type), ("status", args.status)) if v}
    rows: list[dict] = []
    after: dict[str, str] = {}
    async with client(args) as c:
        while True:
            # Keyset paging: each page starts after the last key seen, so deep pages cost what the first does.
            out = await c.call("GET", f"/keystores/{args.keystore}/keys", params={**params, **after,
                                                                                   "pageSize": "1000"})
            rows += out["keyList"]
            if len(out["keyList"]) < 1000:
                break
            after = {"after": out["keyList"][-1]["keyId"]}
    output(args, {"keyList": rows}, COLUMNS, rows, title=f"keys of key store {args.keystore}")
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", f"/keys/{args.key_id}")
    output(args, out, title=f"key {args.key_id}")
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    body = {}
    value = read_secret_value(args.value_file)
    if value is not None:
        body["secretValue"] = value
    async with client(args) as c:
        out = await c.call("POST", f"/keys/{args.key_id}/rotate", body)
    output(args, out, title="key rotated")
    return 0


async def _delete(args: argparse.Namespace) -> int:
    async with client(args) as c:
        if args.now:
            out = await c.call("DELETE", f"/keys/{args.key_id}")
        else:
            out = await c.call("POST", f"/keys/{args.key_id}/schedule-deletion")
    output(args, out, title="key deleted" if args.now else "key scheduled for deletion")
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", f"/keys/{args.key_id}/cancel-deletion")
    output(args, out, title="deletion cancelled")
    return 0


async def _update(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("description", args.description), ("autoRotationPeriod", args.rotation_days))
            if v is not None}
    async with client(args) as c:
        out = await c.call("PATCH", f"/keys/{args.key_id}", body)
    output(args, out, title="key updated")
    return 0
