"""`skm auth cert|ip|mac ...`: a key store's client authentication data.

Certificates: `create` issues one (the password comes from --password-file,
SKM_CERT_PASSWORD or a prompt, never an argument), `download` saves its PKCS#12
bundle (0600), `list`, `delete` (schedules; --now deletes a scheduled one;
--cancel puts it back in service). IPv4/CIDR and MAC entries: `add`, `list`,
`delete` with the same life cycle.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from server.cli.common import (CliError, Col, add_connection_args, add_yes_arg, client, confirm, listing, output,
                               resolve_store_id)

# The certificate's name is how the CLI names it (kept); its fingerprint is shown whole or not at all.
CERT_COLUMNS = [Col("name", "name", keep=True), Col("status", "status"), Col("expirationDate", "expires"),
                Col("fingerprint", "fingerprint", rank=9), Col("description", "description", wrap=True),
                Col("deletionDatetime", "deletion")]
ENTRY_COLUMNS = [Col("value", "value", keep=True), Col("status", "status"),
                 Col("description", "description", wrap=True), Col("deletionDatetime", "deletion"),
                 Col("creationUser", "createdBy", wrap=True)]
API_FLAGS = {"lifeTime": "--life-time"}


def register(sub) -> None:
    p = sub.add_parser("auth", help="manage key-store client authentication data (certificates, IPv4, MAC)",
                       description="Register, list and delete a key store's client certificates, IPv4/CIDR "
                                   "entries and MAC addresses.")
    s = p.add_subparsers(dest="auth_kind", metavar="KIND")
    s.required = True
    _cert_commands(s)
    for kind, path, what in (("ip", "ipv4s", "IPv4 address or CIDR block"), ("mac", "macs", "MAC address")):
        _entry_commands(s, kind, path, what)


def _sub(s, name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
    return s.add_parser(name, help=help_, description=description or help_[0].upper() + help_[1:] + ".")


def _cert_commands(s) -> None:
    p = _sub(s, "cert", "client certificates the server issues to a key store",
             "Issue, download, list and delete a key store's client certificates (PKCS#12).")
    c = p.add_subparsers(dest="cert_command", metavar="SUBCOMMAND")
    c.required = True

    cr = _sub(c, "create", "issue a client certificate",
              "Issue a client certificate for the key store. The PKCS#12 password is read from --password-file, "
              "SKM_CERT_PASSWORD or a prompt. With --out the bundle is downloaded at once.")
    cr.add_argument("keystore", help="key store id or name")
    cr.add_argument("name", help="certificate name (A-Z a-z 0-9 . _ -)")
    cr.add_argument("--life-time", type=int, default=365, help="validity in days (default 365)")
    cr.add_argument("--description", default="")
    cr.add_argument("--password-file", help="file whose first line is the PKCS#12 password")
    cr.add_argument("--out", help="also save the PKCS#12 bundle to this file")
    add_connection_args(cr)
    cr.set_defaults(func=_cert_create, api_flags=API_FLAGS)

    dl = _sub(c, "download", "save a certificate's PKCS#12 bundle",
              "Save the PKCS#12 bundle (protected by the password chosen at issue) to a file, mode 0600.")
    dl.add_argument("keystore", help="key store id or name")
    dl.add_argument("name")
    dl.add_argument("--out", help="file to write (default NAME.p12)")
    add_connection_args(dl)
    dl.set_defaults(func=_cert_download)

    ls = _sub(c, "list", "list a key store's client certificates")
    ls.add_argument("keystore", help="key store id or name")
    add_connection_args(ls)
    ls.set_defaults(func=_cert_list)

    de = _sub(c, "delete", "schedule a certificate for deletion (--now: delete a scheduled one)",
              "Schedule a certificate for deletion (it stops working at once); --now deletes one already "
              "scheduled; --cancel puts a scheduled one back in service.")
    de.add_argument("keystore", help="key store id or name")
    de.add_argument("name")
    _delete_flags(de)
    add_connection_args(de)
    de.set_defaults(func=_cert_delete)


def _delete_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--now", action="store_true", help="delete an entry already scheduled for deletion (asks "
                   "first on a terminal; cannot be undone)")
    g.add_argument("--cancel", action="store_true", help="cancel a scheduled deletion")
    add_yes_arg(p)


def _entry_commands(s, kind: str, path: str, what: str) -> None:
    p = _sub(s, kind, f"a key store's {what} entries", f"Add, list and delete a key store's {what} entries.")
    c = p.add_subparsers(dest=f"{kind}_command", metavar="SUBCOMMAND")
    c.required = True

    a = _sub(c, "add", f"register a {what}")
    a.add_argument("keystore", help="key store id or name")
    a.add_argument("value")
    a.add_argument("--description", default="")
    add_connection_args(a)
    a.set_defaults(func=_entry_add, path=path)

    ls = _sub(c, "list", f"list {what} entries")
    ls.add_argument("keystore", help="key store id or name")
    add_connection_args(ls)
    ls.set_defaults(func=_entry_list, path=path)

    de = _sub(c, "delete", f"schedule a {what} for deletion (--now: delete a scheduled one)",
              f"Schedule a {what} for deletion (it stops matching at once); --now deletes one already scheduled; "
              "--cancel puts a scheduled one back in service.")
    de.add_argument("keystore", help="key store id or name")
    de.add_argument("value")
    _delete_flags(de)
    add_connection_args(de)
    de.set_defaults(func=_entry_delete, path=path)


def read_password(path: str | None) -> str:
    if path:
        lines = Path(path).read_text().splitlines()
        return lines[0] if lines else ""
    if os.environ.get("SKM_CERT_PASSWORD"):
        return os.environ["SKM_CERT_PASSWORD"]
    if sys.stdin is None or not sys.stdin.isatty():
        raise CliError("give the PKCS#12 password with --password-file or SKM_CERT_PASSWORD (standard input is not "
                       "a terminal to ask on)")
    first = getpass.getpass("PKCS#12 password: ")
    if getpass.getpass("again: ") != first:
        raise CliError("the passwords differ; nothing was changed")
    return first


def save_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


async def _cert_create(args: argparse.Namespace) -> int:
    password = read_password(args.password_file)
    body = {"name": args.name, "password": password, "lifeTime": args.life_time, "description": args.description}
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("POST", f"/keystores/{ks}/certificates", body)
        if args.out:
            save_private(Path(args.out), await c.raw("GET", f"/keystores/{ks}/certificates/"
                                                             f"{args.name}/bundle"))
    output(args, out, title="certificate issued" + (f" (bundle saved to {args.out})" if args.out else ""))
    return 0


async def _cert_download(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.name}.p12")
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        data = await c.raw("GET", f"/keystores/{ks}/certificates/{args.name}/bundle")
    save_private(out, data)
    print(f"saved {out} ({len(data)} bytes, PKCS#12, protected by the certificate's password)", file=sys.stderr)
    return 0


async def _cert_list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("GET", f"/keystores/{ks}/certificates")
    listing(args, out, CERT_COLUMNS, out["certificates"], title=f"certificates of key store {args.keystore}")
    return 0


def _step(args: argparse.Namespace) -> str:
    return "delete" if args.now else "cancel-deletion" if args.cancel else "schedule-deletion"


async def _cert_delete(args: argparse.Namespace) -> int:
    if args.now:
        confirm(args, f"deleting certificate {args.name!r} of key store {args.keystore} now")
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("POST", f"/keystores/{ks}/certificates/{_step(args)}", {"name": args.name})
    output(args, out, title="certificate " + _step(args).replace("-", " "))
    return 0


async def _entry_add(args: argparse.Namespace) -> int:
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("POST", f"/keystores/{ks}/auths/{args.path}",
                           {"value": args.value, "description": args.description})
    output(args, out, title="entry registered")
    return 0


async def _entry_list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("GET", f"/keystores/{ks}/auths/{args.path}")
    listing(args, out, ENTRY_COLUMNS, out["entries"], title=f"{args.path} of key store {args.keystore}")
    return 0


async def _entry_delete(args: argparse.Namespace) -> int:
    if args.now:
        confirm(args, f"deleting {args.value} from the {args.path} of key store {args.keystore} now")
    async with client(args) as c:
        ks = await resolve_store_id(c, args.keystore)
        out = await c.call("POST", f"/keystores/{ks}/auths/{args.path}/{_step(args)}",
                           {"value": args.value})
    output(args, out, title="entry " + _step(args).replace("-", " "))
    return 0
