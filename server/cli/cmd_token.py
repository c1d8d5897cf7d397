"""`skm token create|list|revoke`: operator API tokens."""
from __future__ import annotations

import argparse
import sys

from server.cli.common import CliError, Col, add_connection_args, client, listing, output

COLUMNS = [Col("tokenId", "tokenId", keep=True), Col("operator", "operator", wrap=True),
           Col("description", "description", wrap=True, rank=9), Col("status", "status"),
           Col("creationDatetime", "created"), Col("expirationDatetime", "expires")]


def register(sub) -> None:
    p = sub.add_parser("token", help="manage operator API tokens",
                       description="Create, list and revoke the API tokens the CLI and scripts use.")
    s = p.add_subparsers(dest="token_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a token (shown once)",
                     description="Create an API token. It is printed once; the server keeps only a digest.")
    c.add_argument("--description", default="")
    c.add_argument("--days", type=float, default=90, help="lifetime in days (default 90; 0 = never expires)")
    c.add_argument("--operator", help="owner (admins only; default: you)")
    add_connection_args(c)
    c.set_defaults(func=_create, api_flags={"expiresInDays": "--days"})

    ls = s.add_parser("list", help="list tokens", description="List your tokens (--all: everyone's, admins only).")
    ls.add_argument("--all", action="store_true", help="every operator's tokens (admin)")
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    r = s.add_parser("revoke", help="revoke a token at once", description="Revoke a token; it stops working at once.")
    r.add_argument("token_id", help="the token id (the part after skm_)")
    add_connection_args(r)
    r.set_defaults(func=_revoke)


async def _create(args: argparse.Namespace) -> int:
    body = {"description": args.description, "expiresInDays": args.days or None}
    if args.operator:
        body["operator"] = args.operator
    async with client(args) as c:
        out = await c.call("POST", "/tokens", body)
    if args.json:
        output(args, out)
    else:
        print(out["token"])
        print(f"token {out['tokenId']} for {out['operator']}: store it now, it is not shown again", file=sys.stderr)
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/tokens", params={"all": "true"} if args.all else None)
    listing(args, out, COLUMNS, out["tokens"], title="tokens")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    token_id = args.token_id
    if token_id.startswith("skm_"):          # a whole token was pasted: use only its id
        token_id = token_id.split("_", 2)[1]
    if len(token_id) != 16 or not set(token_id) <= set("0123456789abcdef"):
        # Not echoed: what was pasted may be a secret.
        raise CliError("that is not a token id (16 hex characters, the part after skm_; `skm token list` shows them)")
    async with client(args) as c:
        out = await c.call("DELETE", f"/tokens/{token_id}")
    output(args, {"tokenId": token_id, "status": "REVOKED"} if out else out, title="token revoked")
    return 0
