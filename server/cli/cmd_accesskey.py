"""`skm accesskey create|list|delete`: user access keys for client API v1.2/v1.3 callers."""
from __future__ import annotations

import argparse
import re
import sys

from server.cli.common import CliError, Col, add_connection_args, client, listing, output

COLUMNS = [Col("accessKeyId", "accessKeyId", keep=True), Col("operator", "operator", wrap=True),
           Col("projectId", "project"), Col("description", "description", wrap=True, rank=9),
           Col("expirationDate", "expires"), Col("creationDatetime", "created")]


def register(sub) -> None:
    p = sub.add_parser("accesskey", help="manage user access keys (client API v1.2/v1.3 credentials)",
                       description="User access keys authenticate client-API v1.2 calls (X-TC-AUTHENTICATION-ID/"
                                   "SECRET) and obtain v1.3 bearer tokens from /oauth2/token/create.")
    s = p.add_subparsers(dest="accesskey_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a user access key (the secret is printed once)",
                     description="Create a user access key for you (or, as an admin, for --operator). The secret "
                                 "access key is printed once and stored only as a digest.")
    c.add_argument("--operator", help="owner (admins only; default: you)")
    c.add_argument("--description", default="")
    c.add_argument("--appkey", help="bind the key to one project's appkey (default: valid for every project)")
    c.add_argument("--expires-days", type=int, help="expire after this many days (default: never)")
    add_connection_args(c)
    c.set_defaults(func=_create, api_flags={"expiresInDays": "--expires-days"})

    ls = s.add_parser("list", help="list user access keys", description="List your user access keys "
                      "(admins: everyone's). Secrets are never shown again.")
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    d = s.add_parser("delete", help="delete a user access key and its tokens",
                     description="Delete a user access key; every bearer token issued from it stops working.")
    d.add_argument("key_id")
    add_connection_args(d)
    d.set_defaults(func=_delete)


async def _create(args: argparse.Namespace) -> int:
    body = {"description": args.description}
    for field, value in (("operator", args.operator), ("appkey", args.appkey), ("expiresInDays", args.expires_days)):
        if value is not None:
            body[field] = value
    async with client(args) as c:
        out = await c.call("POST", "/access-keys", body)
    output(args, out, title="user access key created")
    if not args.json:
        print("The secret access key is shown only this once: store it now.", file=sys.stderr)
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/access-keys")
    listing(args, out, COLUMNS, out["accessKeys"], title="user access keys")
    return 0


async def _delete(args: argparse.Namespace) -> int:
    if not re.fullmatch(r"[A-Z0-9]{1,64}", args.key_id):
        raise CliError(f"{args.key_id[:70]!r} is not an access key id (capital letters and digits; `skm accesskey "
                       "list` shows them)")
    async with client(args) as c:
        out = await c.call("DELETE", f"/access-keys/{args.key_id}")
    output(args, out, title="user access key deleted")
    return 0
