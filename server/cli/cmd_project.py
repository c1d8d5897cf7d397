"""`skm project create|list|show`: projects (several teams, one server), each with its appkey."""
from __future__ import annotations

import argparse

from server.cli.cmd_operator import project_id
from server.cli.common import Col, add_connection_args, client, listing, output

# Display order; `rank` is the drop order on a narrow terminal (highest first): never the id or the appkey.
COLUMNS = [Col("id", "id", keep=True), Col("name", "name", wrap=True, rank=2), Col("appkey", "appkey", keep=True),
           Col("description", "description", wrap=True, rank=4), Col("createdAt", "createdAt", rank=3),
           Col("dataPlaneUrl", "dataPlaneUrl", rank=5)]


def register(sub) -> None:
    p = sub.add_parser("project", help="manage projects (each has its own appkey and key stores)",
                       description="Create, list and show projects. A project groups key stores under one appkey; "
                       "operators may hold roles in one project only (`skm operator grant NAME --role R --project "
                       "P`).")
    s = p.add_subparsers(dest="project_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="create a project (global admin)",
                     description="Create a project; prints its appkey (clients use it in the client-API path) and "
                     "its data-plane URL (from the server's public_url, else its data listener).")
    c.add_argument("name")
    c.add_argument("--description", default="")
    add_connection_args(c)
    c.set_defaults(func=_create)

    ls = s.add_parser("list", help="list projects",
                      description="List the projects you can see, with appkeys and data-plane URLs (a narrow "
                      "terminal drops the URL column first; --json has everything).")
    add_connection_args(ls)
    ls.set_defaults(func=_list)

    sh = s.add_parser("show", help="show one project",
                      description="Show one project (by id or name): its appkey and data-plane URL.")
    sh.add_argument("project", help="project id or name")
    add_connection_args(sh)
    sh.set_defaults(func=_show)


async def _create(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("POST", "/projects", {"name": args.name, "description": args.description})
    output(args, out, title="project created")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with client(args) as c:
        out = await c.call("GET", "/projects")
    listing(args, out, COLUMNS, out["projects"], title="projects")
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with client(args) as c:
        pid = await project_id(c, args.project)
        out = await c.call("GET", f"/projects/{pid}")
    output(args, out, title=f"project {out['name']}")
    return 0
