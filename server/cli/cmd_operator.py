"""`skm operator create|list|show|update|grant|revoke|roles|delete`, `skm login`, `skm whoami`."""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from server.cli.common import CONFIG_FILE, Col, add_connection_args, client, connection, fail, listing, output

COLUMNS = [Col("name", "name", keep=True), Col("role", "role"), Col("projectRoles", "projectRoles", wrap=True),
           Col("disabled", "disabled"), Col("locked", "locked"), Col("hasPassword", "password"),
           Col("createdBy", "createdBy", wrap=True), Col("creationDatetime", "created")]
ROLE_HELP = ("admin changes key stores and keys; approver decides change requests; viewer reads. Global by "
             "default; --project PROJECT (id or name) limits the role to that project")


def register(sub) -> None:
    p = sub.add_parser("operator", help="manage operators (admin, approver, viewer)",
                       description="Create, list, change and delete the operators of the management plane.")
    s = p.add_subparsers(dest="operator_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create an operator", description="Create an operator. With --password-stdin "
                     "the password is read from standard input (never an argument: arguments show in `ps`).")
    c.add_argument("name")
    c.add_argument("--role", required=True, choices=["admin", "approver", "viewer"], help=ROLE_HELP)
    c.add_argument("--project", help="the role in this project only (id or name); default: a global role")
    c.add_argument("--password-stdin", action="store_true", help="read a login password from standard input")
    add_connection_args(c)
    c.set_defaults(func=_create)

    g = s.add_parser("grant", help="grant a role, global or in one project",
                     description="Grant NAME a role: global, or with --project in that project only. A previous "
                     "role at the same scope is replaced (the history is kept: `skm operator roles NAME`). With "
                     "[approvals] operators = true this becomes a change request another global admin approves.")
    g.add_argument("name")
    g.add_argument("--role", required=True, choices=["admin", "approver", "viewer"], help=ROLE_HELP)
    g.add_argument("--project", help="project id or name (default: the global role)")
    add_connection_args(g)
    g.set_defaults(func=_grant)

    rv = s.add_parser("revoke", help="revoke a role (global, or in one project)",
                      description="Take away NAME's role in --project, or its global role without --project. "
                      "Takes effect at once (revoking never needs approval).")
    rv.add_argument("name")
    rv.add_argument("--project", help="project id or name (default: the global role)")
    add_connection_args(rv)
    rv.set_defaults(func=_revoke)

    rh = s.add_parser("roles", help="every role an operator ever held",
                      description="Show every role grant of NAME: role, project, who granted it and when, who "
                      "revoked it and when.")
    rh.add_argument("name")
    add_connection_args(rh)
    rh.set_defaults(func=_roles)

    ls = s.add_parser("list", help="list operators", description="List every operator and their state.")
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    sh = s.add_parser("show", help="show one operator", description="Show one operator.")
    sh.add_argument("name")
    add_connection_args(sh)
    sh.set_defaults(func=_show)

    u = s.add_parser("update", help="change role, password, disabled flag or lockout",
                     description="Change an operator (admin), or your own password (anyone, with the current one).")
    u.add_argument("name")
    u.add_argument("--role", choices=["admin", "approver", "viewer"])
    u.add_argument("--disable", dest="disabled", action="store_const", const=True, default=None,
                   help="disable: every token stops working at once")
    u.add_argument("--enable", dest="disabled", action="store_const", const=False, help="enable again")
    u.add_argument("--unlock", action="store_true", help="clear a login lockout")
    u.add_argument("--password-stdin", action="store_true",
                   help="read the new password from standard input (first line; a second line: your current one)")
    add_connection_args(u)
    u.set_defaults(func=_update)

    d = s.add_parser("delete", help="delete an operator and their tokens", description="Delete an operator.")
    d.add_argument("name")
    add_connection_args(d)
    d.set_defaults(func=_delete)

    lg = sub.add_parser("login", help="log in with name and password; prints or saves a token",
                        description="Log in to the management API. The password is read from standard input when "
                        "it is not a terminal, else prompted. --save stores the token, address and CA in the "
                        "config file (0600).")
    lg.add_argument("name")
    lg.add_argument("--save", action="store_true", help=f"write the token to {CONFIG_FILE}")
    add_connection_args(lg)
    lg.set_defaults(func=_login)

    w = sub.add_parser("whoami", help="show the operator of the current token",
                       description="Show the operator and role the current token belongs to.")
    add_connection_args(w)
    w.set_defaults(func=_whoami)


def read_password(prompt: str = "password: ", *, allow_empty: bool = False) -> str:
    password = getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password and not allow_empty:
        # Said here: the server's answer would be a schema message ("String should have at least 1 character").
        raise SystemExit(fail("no password given: type it at the prompt, or send it as the first line of "
                              "standard input", 2))
    return password


async def project_id(c, project: str | None) -> int | None:
    """A project named by id or by name, resolved through the projects the caller can see."""
    if project is None:
        return None
    projects = (await c.call("GET", "/projects"))["projects"]
    for p in projects:
        if str(p["id"]) == project or p["name"] == project:
            return int(p["id"])
    from server.errors import NotFound
    raise NotFound(f"no project {project!r}; see `skm project list`")


def _flat(o: dict) -> dict:
    scoped = [f"{g['role']}@{g['projectId']}" for g in o.get("roles", []) if g.get("projectId") is not None]
    return {**o, "projectRoles": ", ".join(scoped) or "-"}


async def _create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "role": args.role}
    if args.password_stdin:
        body["password"] = read_password()
    async with client(args) as c:
        pid = await project_id(c, args.project)
        if pid is not None:
            body["projectId"] = pid
        out = await c.call("POST", "/operators", body)
    output(args, out, title="operator created")
    return 0


async def _grant(args: argparse.Namespace) -> int:
    async with client(args) as c:
        body = {"role": args.role}
        pid = await project_id(c, args.project)
        if pid is not None:
            body["projectId"] = pid
        out = await c.call("POST", f"/operators/{args.name}/roles", body)
    output(args, out, title="role granted")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    async with client(args) as c:
        pid = await project_id(c, args.project)
        out = await c.call("DELETE", f"/operators/{args.name}/roles",
                           params={"projectId": str(pid)} if pid is not None else None)
    output(args, out, title="role revoked")
    return 0


async def _roles(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", f"/operators/{args.name}/roles")
    output(args, out, ["role", "projectId", "grantedBy", "grantedAt", "revokedBy", "revokedAt"], out["grants"],
           title=f"roles of {args.name}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/operators")
    listing(args, out, COLUMNS, [_flat(o) for o in out["operators"]], title="operators")
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", f"/operators/{args.name}")
    output(args, out)
    return 0


async def _update(args: argparse.Namespace) -> int:
    body: dict = {}
    if args.role:
        body["role"] = args.role
    if args.disabled is not None:
        body["disabled"] = args.disabled
    if args.unlock:
        body["unlock"] = True
    if args.password_stdin:
        body["password"] = read_password("new password: ")
        # Non-admins prove their current password; admins may leave it empty.
        current = read_password("current password (empty if you are an admin): ", allow_empty=True)
        if current:
            body["currentPassword"] = current
    if not body:
        return fail("nothing to change; see `skm operator update --help`", 2)
    async with client(args) as c:
        out = await c.call("PATCH", f"/operators/{args.name}", body)
    output(args, out, title="operator updated")
    return 0


async def _delete(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("DELETE", f"/operators/{args.name}")
    output(args, out, title="operator deleted")
    return 0


async def _login(args: argparse.Namespace) -> int:
    password = read_password()
    conn = connection(args)._replace(token=None)     # logging in: no token yet
    from server.cli.common import MgmtClient
    async with MgmtClient(conn) as c:
        out = await c.call("POST", "/login", {"name": args.name, "password": password})
    if args.save:
        _save(conn.addr, out["token"], conn.ca)
        out = {**out, "token": f"saved to {CONFIG_FILE}"}
    if args.json:
        output(args, out)
    elif args.save:
        print(f"logged in as {out['operator']} ({out['role']}); token saved to {CONFIG_FILE}")
    else:
        # The token alone on stdout, so `export SKM_TOKEN=$(skm login NAME)` works.
        print(out["token"])
        print(f"logged in as {out['operator']} ({out['role']}); the token is valid for "
              f"{out['expiresInHours']:g} hours", file=sys.stderr)
    return 0


def _save(addr: str, token: str, ca: str | None) -> None:
    import tomllib
    path = Path(CONFIG_FILE)
    cfg = tomllib.loads(path.read_text()) if path.exists() else {}
    cfg.update({"addr": addr, "token": token})
    if ca:
        cfg["ca"] = str(Path(ca).resolve())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = [f"{k} = {_toml_str(str(v))}" for k, v in cfg.items() if isinstance(v, (str, int))]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _whoami(args: argparse.Namespace) -> int:
    from server.cli.common import with_appkeys
    async with client(args) as c:
        out = await with_appkeys(c, await c.call("GET", "/whoami"))
    output(args, out)
    return 0
