"""`skm key rollout KEY` and `skm key version disable|enable KEY V`, registered under `skm key`.

Kept apart from cmd_key.py (it registers first: modules load in name order) so the two evolve
independently.
"""
from __future__ import annotations

import argparse

from server.cli.common import add_connection_args, client, fail, output, resolve_key
from server.cli.cmd_key import KEY_REF

COLUMNS = ["host", "mac", "version", "ackDatetime", "deliveredDatetime", "reloadOk", "stale"]


def _key_subcommands(sub) -> argparse._SubParsersAction:
    key = sub.choices.get("key")
    if key is None:                       # cmd_key not loaded: stand alone
        key = sub.add_parser("key", help="manage keys", description="Manage keys.")
    for action in key._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    s = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    s.required = True
    return s


def register(sub) -> None:
    s = _key_subcommands(sub)
    r = s.add_parser("rollout", help="which version each sidecar host holds",
                     description="Show, per sidecar host (certificate name, attested MAC), the version of the key it "
                                 "holds, when it acknowledged it, whether its reload succeeded, and a summary such as "
                                 "'version 3 on 12 of 14 hosts'. Hosts silent longer than their TTL are stale.")
    r.add_argument("key_id", metavar="KEY", help=KEY_REF)
    add_connection_args(r)
    r.set_defaults(func=_rollout)

    v = s.add_parser("version", help="disable or enable a key version",
                     description="Disable a key version (decrypt, verify and export with it are refused) or enable "
                                 "it again.")
    vs = v.add_subparsers(dest="version_command", metavar="SUBCOMMAND")
    vs.required = True
    d = vs.add_parser("disable", help="disable a version (refused while any host, stale ones included, holds it)",
                      description="Disable version V of a key. Refused while a sidecar host's last report holds V, a "
                                  "stale host's too (see `skm key rollout`), unless --force; the current version "
                                  "cannot be disabled.")
    d.add_argument("key_id", metavar="KEY", help=KEY_REF)
    d.add_argument("version", type=int)
    d.add_argument("--force", action="store_true",
                   help="disable even though hosts still hold it (recorded as forced in the audit log)")
    add_connection_args(d)
    d.set_defaults(func=_disable)
    e = vs.add_parser("enable", help="enable a disabled version", description="Enable a disabled key version again.")
    e.add_argument("key_id", metavar="KEY", help=KEY_REF)
    e.add_argument("version", type=int)
    add_connection_args(e)
    e.set_defaults(func=_enable)


async def _rollout(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", f"/keys/{await resolve_key(c, args.key_id)}/rollout")
    rows = [{**h, "mac": h.get("mac") or "", "reloadOk": "" if h.get("reloadOk") is None else
             ("yes" if h["reloadOk"] else "FAILED"), "stale": "STALE" if h.get("stale") else ""}
            for h in out["hostList"]]
    output(args, out, COLUMNS, rows, title=out["summary"])
    return 0


async def _disable(args: argparse.Namespace) -> int:
    if args.version < 0:
        return fail("the version is a whole number from 0", 2)
    async with client(args) as c:
        out = await c.call("POST", f"/keys/{await resolve_key(c, args.key_id)}/versions/{args.version}/disable",
                           {"force": True} if args.force else None)
    output(args, out, title=f"version {args.version} disabled" + (" (forced)" if out.get("forced") else ""))
    return 0


async def _enable(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", f"/keys/{await resolve_key(c, args.key_id)}/versions/{args.version}/enable")
    output(args, out, title=f"version {args.version} enabled")
    return 0
