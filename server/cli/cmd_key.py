"""`skm key create|list|show|reveal|rotate|update|delete|cancel-delete`.

A key is named by its id (32 hex) or as STORE/NAME (a key store's name or id, a slash, the key's
name). A secret's value comes from, in this order: --value-file, SKM_SECRET_VALUE, piped standard
input, or a prompt on a terminal; never from an argument (arguments show in `ps`). An empty value
is refused, here and by the server.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys

from server.cli.common import (CliError, Col, add_connection_args, add_yes_arg, client, confirm, output,
                               print_table, resolve_key, resolve_store_id, shown)

TYPES = ["SECRET", "SYMMETRIC_KEY", "ASYMMETRIC_KEY"]
SPECS = ["RSA-2048", "RSA-3072", "RSA-4096", "EC-P256", "EC-P384", "ED25519", "AES-256-GCM"]
# Most important first: the table drops columns from the end when the terminal is narrow; never the id.
COLUMNS = [Col("keyId", "keyId", keep=True), Col("name", "name", wrap=True), Col("keyType", "type"),
           Col("keyStatus", "status"), Col("deletionDatetime", "deletion"), Col("currentKeyValueVersion", "version"),
           Col("keySpec", "spec"), Col("autoRotationPeriod", "rotation days")]
KEY_REF = "key id (32 hex characters) or STORE/NAME (key store name or id / key name)"
SECRET_SOURCES = "--value-file, SKM_SECRET_VALUE or standard input"
# API field names in server messages -> what the user typed (only names that cannot be ordinary words).
API_FLAGS = {"keyType": "--type", "keySpec": "--spec", "autoRotationPeriod": "--rotation-days",
             "secretValue": f"the secret value ({SECRET_SOURCES})"}


def register(sub) -> None:
    p = sub.add_parser("key", help="manage keys", description="Create, list, show, reveal, rotate and delete keys. "
                       f"A key is named by its {KEY_REF}.")
    s = p.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a key", description="Create a SECRET, SYMMETRIC_KEY or ASYMMETRIC_KEY. "
                     "A secret's value is read from --value-file, else SKM_SECRET_VALUE, else standard input when "
                     "it is not a terminal, else a prompt; never from an argument (arguments show in `ps`). An "
                     "empty value is refused.")
    c.add_argument("keystore", help="key store id or name")
    c.add_argument("name")
    c.add_argument("--type", required=True, type=str.upper, choices=TYPES, dest="key_type",
                   help="key type (any case)")
    c.add_argument("--spec", type=str.upper, choices=SPECS,
                   help="ASYMMETRIC_KEY: RSA-2048 (default), RSA-3072, RSA-4096, EC-P256, EC-P384, ED25519; "
                        "SYMMETRIC_KEY: AES-256-GCM (any case)")
    c.add_argument("--description", default="")
    c.add_argument("--rotation-days", type=int, default=0, help="automatic rotation period (0 = off; not for "
                   "secrets)")
    c.add_argument("--exportable", action="store_true", help="allow exporting the key material (one-way)")
    c.add_argument("--value-file", help="SECRET: file holding the value ('-' for standard input)")
    add_connection_args(c)
    c.set_defaults(func=_create, api_flags=API_FLAGS)

    ls = s.add_parser("list", help="list a key store's keys", description="List the keys of a key store. Key ids "
                      "are never shortened: on a narrow terminal the last columns are left out (--json has all).")
    ls.add_argument("keystore", help="key store id or name")
    ls.add_argument("--type", dest="key_type", type=str.upper, choices=TYPES, help="only keys of this type "
                    "(any case)")
    ls.add_argument("--status", type=str.lower, choices=["active", "inactive"])
    add_connection_args(ls)
    ls.set_defaults(func=_list, api_flags=API_FLAGS)

    for name, help_, func in (("show", "show a key and its versions", _show),
                              ("reveal", "print a SECRET's current value (admin; recorded in the audit log)",
                               _reveal),
                              ("rotate", "rotate now (a SECRET takes its new value like create does)", _rotate),
                              ("delete", "schedule deletion, or --now to delete a scheduled key", _delete),
                              ("cancel-delete", "cancel a scheduled deletion", _cancel)):
        sp = s.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        sp.add_argument("key", metavar="KEY", help=KEY_REF)
        if name == "rotate":
            sp.description += (" A SECRET's new value is read from --value-file, else SKM_SECRET_VALUE, else "
                               "standard input when it is not a terminal, else a prompt.")
            sp.add_argument("--value-file", help="SECRET: file holding the new value ('-' for standard input)")
        if name == "delete":
            sp.add_argument("--now", action="store_true", help="delete a key already scheduled for deletion "
                            "(asks first on a terminal; cannot be undone)")
            add_yes_arg(sp)
        add_connection_args(sp)
        sp.set_defaults(func=func, api_flags=API_FLAGS)

    u = s.add_parser("update", help="change description or rotation period",
                     description="Change a key's description or automatic rotation period.")
    u.add_argument("key", metavar="KEY", help=KEY_REF)
    u.add_argument("--description")
    u.add_argument("--rotation-days", type=int)
    add_connection_args(u)
    u.set_defaults(func=_update, api_flags=API_FLAGS)


def read_secret_value(value_file: str | None) -> str:
    """The value, from the first source given: --value-file, SKM_SECRET_VALUE, piped stdin, a prompt."""
    if value_file == "-":
        value, source = _read_stdin(), "standard input (--value-file -)"
    elif value_file:
        try:
            with open(value_file, encoding="utf-8") as f:
                value = f.read()
        except UnicodeDecodeError:
            raise CliError(f"--value-file {value_file} is not UTF-8 text; a secret value is text") from None
        source = f"--value-file {value_file}"
    elif "SKM_SECRET_VALUE" in os.environ:
        value, source = os.environ["SKM_SECRET_VALUE"], "SKM_SECRET_VALUE"
    elif sys.stdin is not None and not sys.stdin.isatty():
        value, source = _read_stdin(), "standard input"
    elif sys.stdin is not None:
        value = getpass.getpass("secret value: ")
        if getpass.getpass("again: ") != value:
            raise CliError("the two values differ; nothing was changed")
        source = "the prompt"
    else:
        raise CliError(f"give the secret value with {SECRET_SOURCES}")
    value = value.rstrip("\r\n")
    if not value:
        unset = " (unset it to read standard input)" if source == "SKM_SECRET_VALUE" else ""
        raise CliError(f"the secret value from {source} is empty{unset}; a secret needs a value")
    return value


def _read_stdin() -> str:
    if sys.stdin is None:
        raise CliError("standard input is closed; give the secret value with --value-file or SKM_SECRET_VALUE")
    return sys.stdin.read()


async def _create(args: argparse.Namespace) -> int:
    secret = args.key_type == "SECRET"
    if not secret and args.value_file:
        raise CliError(f"--value-file is for a SECRET; a {args.key_type} makes its own key material")
    if secret and args.rotation_days:
        raise CliError("--rotation-days is not for a SECRET: a secret changes when you give it a new value "
                       "(`skm key rotate`)")
    if secret and args.spec:
        raise CliError("--spec is not for a SECRET")
    body = {"keyType": args.key_type, "name": args.name, "description": args.description,
            "autoRotationPeriod": args.rotation_days, "exportable": args.exportable}
    if args.spec:
        body["keySpec"] = args.spec
    if secret:
        body["secretValue"] = read_secret_value(args.value_file)
    async with client(args) as c:
        store = await resolve_store_id(c, args.keystore)
        out = await c.call("POST", f"/keystores/{store}/keys", body)
    output(args, out, title="key created")
    return 0


async def _list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("type", args.key_type), ("status", args.status)) if v}
    rows: list[dict] = []
    after: dict[str, str] = {}
    async with client(args) as c:
        store = await resolve_store_id(c, args.keystore)
        while True:
            # Keyset paging: each page starts after the last key seen, so deep pages cost what the first does.
            out = await c.call("GET", f"/keystores/{store}/keys", params={**params, **after, "pageSize": "1000"})
            rows += out["keyList"]
            if len(out["keyList"]) < 1000:
                break
            after = {"after": out["keyList"][-1]["keyId"]}
    if args.json:
        output(args, {"keyList": rows})
    else:
        # A key whose row fails its seal is refused at every use: say so where its status is read.
        rows = [{**r, "keyStatus": "INVALID"} if r.get("integrity") == "INVALID" else r for r in rows]
        print_table(COLUMNS, rows, title=f"keys of key store {args.keystore}")
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        out = await c.call("GET", f"/keys/{key_id}")
    output(args, out, title=f"key {key_id}")
    return 0


async def _reveal(args: argparse.Namespace) -> int:
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        out = await c.call("POST", f"/keys/{key_id}/reveal")
    if args.json:
        output(args, out)
    else:
        # Raw into a pipe (the value is the point); escaped on a terminal, where control characters would act.
        print(shown(out["secretValue"]) if sys.stdout.isatty() else out["secretValue"])
        print(f"secret {key_id} version {out['keyVersion']}: revealed (recorded in the audit log as key.reveal)",
              file=sys.stderr)
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        key = await c.call("GET", f"/keys/{key_id}")
        body = {}
        if key["keyType"] == "SECRET":
            body["secretValue"] = read_secret_value(args.value_file)
        elif args.value_file:
            raise CliError(f"--value-file is for a SECRET; key {key_id} is a {key['keyType']}, which makes its own "
                           "new key material")
        out = await c.call("POST", f"/keys/{key_id}/rotate", body)
    output(args, out, title="key rotated")
    return 0


async def _delete(args: argparse.Namespace) -> int:
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        if args.now:
            key = await c.call("GET", f"/keys/{key_id}")
            confirm(args, f"deleting key {key['name']!r} ({key_id}) of key store {key['keyStoreId']} and all its "
                          "versions now")
            out = await c.call("DELETE", f"/keys/{key_id}")
        else:
            out = await c.call("POST", f"/keys/{key_id}/schedule-deletion")
    output(args, out, title="key deleted" if args.now else "key scheduled for deletion")
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        out = await c.call("POST", f"/keys/{key_id}/cancel-deletion")
    output(args, out, title="deletion cancelled")
    return 0


async def _update(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("description", args.description), ("autoRotationPeriod", args.rotation_days))
            if v is not None}
    if not body:
        raise CliError("nothing to change: give --description and/or --rotation-days")
    async with client(args) as c:
        key_id = await resolve_key(c, args.key)
        out = await c.call("PATCH", f"/keys/{key_id}", body)
    output(args, out, title="key updated")
    return 0
