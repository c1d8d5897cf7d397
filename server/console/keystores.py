"""Key stores: list, create, the keys of a store, settings (client checks, MAC verification, approval)."""
from __future__ import annotations

from aiohttp import web

from server.console.web import PREFIX, ConsoleRoutes, Ctx, form_bool, form_int, form_str, render, see_other
from server.errors import ApprovalRequired, Forbidden, InvalidRequest, KeyStoreNotFound, SKMError
from server.runtime import ERROR
import server.keys.stores  # noqa: F401  (registers the keystore.delete change)

routes = ConsoleRoutes()
_KS = r"/keystores/{keystore_id:\d{1,12}}"

MAC_MODES = [
    ("attested", "Attested", "The MAC must be bound in the client's host certificate (sidecar). Recommended."),
    ("neighbor", "Neighbour table", "The server checks the peer's MAC in its ARP table. Strongest, same L2 segment "
                                    "only."),
    ("header", "Header (weak)", "Trusts the X-TOAST-CLIENT-MAC-ADDR header as sent (NHN compatible). Anyone can "
                                "type any MAC: use only for compatibility."),
]


async def keystore_of(c: Ctx):
    """The store of `{keystore_id}`: another project's answers as if it did not exist (the route's roles are
    checked in the store's project)."""
    ks = await c.rt.keys.keystore(int(c.match("keystore_id")))
    c.in_scope(ks.project_id, KeyStoreNotFound(f"no key store with id {ks.id}"))
    return ks


async def admin_projects(c: Ctx) -> list:
    """The projects this operator may create key stores in (admin there, or a global admin)."""
    return [p for p in await c.rt.keys.projects() if c.op.has(("admin",), p.id)]


def _settings_from_form(c: Ctx) -> dict:
    return {
        "name": form_str(c, "name", limit=200).strip(),
        "description": form_str(c, "description", limit=2000),
        "ip4_auth": form_bool(c, "ip4_auth"), "mac_auth": form_bool(c, "mac_auth"),
        "cert_auth": form_bool(c, "cert_auth"), "auth_mode": form_str(c, "auth_mode", "AND", 8),
        "mac_mode": form_str(c, "mac_mode", "attested", 16),
        "approval_required": form_bool(c, "approval_required"),
        "approvals_needed": form_int(c, "approvals_needed", 1, 1, 10, "Approvals needed"),
    }


STORE_SORTS = ("name", "keys", "changed", "id")


@routes.get("/keystores")
async def list_keystores(c: Ctx) -> web.Response:
    from server.console.lists import listing
    lst = listing(c.request.query, STORE_SORTS)
    stores = await c.rt.keys.keystores()
    scope = c.op.projects()
    if scope is not None:
        stores = [s for s in stores if s.project_id in scope]
    project = c.request.query.get("project", "")
    if project.isascii() and project.isdigit() and len(project) < 13:
        lst.extra["project"] = project           # the Projects page links here per project
        stores = [s for s in stores if s.project_id == int(project)]
    if lst.q:
        needle = lst.q.lower()
        stores = [s for s in stores if needle in s.name.lower()]
    rows = await c.rt.storage.fetchall("SELECT keystore_id, COUNT(*) AS n FROM keys GROUP BY keystore_id")
    counts = {r["keystore_id"]: int(r["n"]) for r in rows}
    projects = {p.id: p.name for p in await c.rt.keys.projects() if c.op.sees(p.id)}
    sort_key = {"name": lambda s: s.name.lower(), "keys": lambda s: counts.get(s.id, 0),
                "changed": lambda s: s.updated_at or "", "id": lambda s: s.id}[lst.sort]
    stores.sort(key=sort_key, reverse=lst.desc)
    lst.total = len(stores)
    lst.page = min(lst.page, lst.pages)
    shown = stores[(lst.page - 1) * lst.size: lst.page * lst.size]
    return render(c, "keystores.html", stores=shown, counts=counts, lst=lst, base="/console/keystores",
                  projects=projects, can_create=any(g.role == "admin" for g in c.op.grants))


@routes.get("/keystores/new", roles=("admin",), per_project=True)
async def new_keystore(c: Ctx) -> web.Response:
    chosen = c.request.query.get("project", "")
    return render(c, "keystore_form.html", ks=None, values={**DEFAULTS, "project_id": chosen}, error=None,
                  mac_modes=MAC_MODES, projects=await admin_projects(c))


DEFAULTS = {"name": "", "description": "", "ip4_auth": True, "mac_auth": False, "cert_auth": False,
            "auth_mode": "AND", "mac_mode": "attested", "approval_required": False, "approvals_needed": 1}


async def _chosen_project(c: Ctx):
    """The project picked on the form: one this operator administers (the form lists only those)."""
    raw = form_str(c, "project_id", limit=20).strip()
    mine = await admin_projects(c)
    if not raw:
        if len(mine) == 1 or (mine and c.op.is_global):
            return mine[0]          # one choice (or a global admin's first project, as before)
        raise InvalidRequest("choose the project the key store belongs to")
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidRequest("project must be a project id")
    found = next((p for p in mine if p.id == int(raw)), None)
    if found is None:
        raise Forbidden("you can create key stores only in a project you administer")
    return found


@routes.post("/keystores/new", roles=("admin",), per_project=True)
async def create_keystore(c: Ctx) -> web.Response:
    values: dict = {}
    try:
        values = _settings_from_form(c)
        project = await _chosen_project(c)
        if len(values["name"]) > 100 or not values["name"]:
            raise InvalidRequest("name must be 1 to 100 characters")
        rest = {k: v for k, v in values.items() if k not in ("name", "description")}
        ks = await c.rt.keys.create_keystore(project.id, values["name"], values["description"], actor=c.op.name,
                                             **rest)
    except SKMError as e:
        c.request[ERROR] = e
        shown = {**DEFAULTS, **values, "project_id": form_str(c, "project_id", limit=20)}
        return render(c, "keystore_form.html", status=e.status, ks=None, values=shown, error=e,
                      mac_modes=MAC_MODES, projects=await admin_projects(c))
    c.flash("ok", f"Key store {ks.name!r} created.")
    return see_other(f"{PREFIX}/keystores/{ks.id}")


@routes.get(_KS)
async def show_keystore(c: Ctx) -> web.Response:
    from server.console.lists import listing
    from server.keys.listing import SORTS, search_keys
    ks = await keystore_of(c)
    lst = listing(c.request.query, SORTS)
    keys, lst.total = await search_keys(c.rt.keys.lookup, ks.id, text=lst.q, sort=lst.sort,
                                        desc=lst.desc, page=lst.page, page_size=lst.size)
    pending = await _pending(c, ks.id)
    return render(c, "keystore.html", ks=ks, keys=keys, tab="keys", pending=pending, lst=lst,
                  base=f"/console/keystores/{ks.id}")


@routes.post(_KS + "/delete", roles=("admin",), per_project=True)
async def delete_keystore(c: Ctx) -> web.Response:
    """Delete an empty key store (409 while it holds keys); a change request when approval is on."""
    ks = await keystore_of(c)
    if form_str(c, "confirm_name", limit=200) != ks.name:
        raise InvalidRequest("type the key store's name to confirm its deletion")
    await c.rt.changes.submit(c.op, ks, "keystore.delete", {"keystore_id": ks.id})
    c.flash("ok", f"Key store {ks.name!r} deleted.")
    return see_other(f"{PREFIX}/keystores")


async def _pending(c: Ctx, ks_id: int) -> int:
    approvals = getattr(c.rt.changes, "approvals", None)
    if approvals is None:
        return 0
    return len(await approvals.list(status="PENDING", keystore_id=ks_id))


@routes.get(_KS + "/settings")
async def keystore_settings(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    return render(c, "keystore_form.html", ks=ks, values=None, error=None, mac_modes=MAC_MODES,
                  pending=await _pending(c, ks.id), tab="settings")


@routes.post(_KS + "/settings", roles=("admin",), per_project=True)
async def update_keystore(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    values: dict = {}
    try:
        values = _settings_from_form(c)
        # Only what differs goes into the change, so a change request's diff says exactly that.
        current = {k: getattr(ks, k) for k in values}
        current["auth_mode"], current["mac_mode"] = ks.auth_mode.value, ks.mac_mode.value
        changes = {k: v for k, v in values.items() if v != current[k]}
        if not changes:
            c.flash("info", "Nothing changed.")
            return see_other(f"{PREFIX}/keystores/{ks.id}/settings")
        await c.rt.changes.submit(c.op, ks, "keystore.update", {"keystore_id": ks.id, "changes": changes})
    except ApprovalRequired:
        raise
    except SKMError as e:
        c.request[ERROR] = e
        return render(c, "keystore_form.html", status=e.status, ks=ks, values=values or None, error=e,
                      mac_modes=MAC_MODES, pending=await _pending(c, ks.id), tab="settings")
    c.flash("ok", "Settings saved.")
    return see_other(f"{PREFIX}/keystores/{ks.id}/settings")

