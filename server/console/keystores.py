"""Key stores: list, create, the keys of a store, settings (client checks, MAC verification, approval)."""
from __future__ import annotations

from aiohttp import web

from server.console.web import PREFIX, ConsoleRoutes, Ctx, form_bool, form_int, form_str, render, see_other
from server.errors import ApprovalRequired, SKMError
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
    return await c.rt.keys.keystore(int(c.match("keystore_id")))


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
    if lst.q:
        needle = lst.q.lower()
        stores = [s for s in stores if needle in s.name.lower()]
    rows = await c.rt.storage.fetchall("SELECT keystore_id, COUNT(*) AS n FROM keys GROUP BY keystore_id")
    counts = {r["keystore_id"]: int(r["n"]) for r in rows}
    sort_key = {"name": lambda s: s.name.lower(), "keys": lambda s: counts.get(s.id, 0),
                "changed": lambda s: s.updated_at or "", "id": lambda s: s.id}[lst.sort]
    stores.sort(key=sort_key, reverse=lst.desc)
    lst.total = len(stores)
    lst.page = min(lst.page, lst.pages)
    shown = stores[(lst.page - 1) * lst.size: lst.page * lst.size]
    return render(c, "keystores.html", stores=shown, counts=counts, lst=lst, base="/console/keystores")


@routes.get("/keystores/new", roles=("admin",))
async def new_keystore(c: Ctx) -> web.Response:
    return render(c, "keystore_form.html", ks=None, values=None, error=None, mac_modes=MAC_MODES)


@routes.post("/keystores/new", roles=("admin",))
async def create_keystore(c: Ctx) -> web.Response:
    values: dict = {}
    try:
        values = _settings_from_form(c)
        project = await c.rt.keys.default_project()
        if len(values["name"]) > 100 or not values["name"]:
            from server.errors import InvalidRequest
            raise InvalidRequest("name must be 1 to 100 characters")
        rest = {k: v for k, v in values.items() if k not in ("name", "description")}
        ks = await c.rt.keys.create_keystore(project.id, values["name"], values["description"], actor=c.op.name,
                                             **rest)
    except SKMError as e:
        c.request[ERROR] = e
        return render(c, "keystore_form.html", status=e.status, ks=None, values=values or None, error=e,
                      mac_modes=MAC_MODES)
    c.flash("ok", f"Key store {ks.name!r} created.")
    return see_other(f"{PREFIX}/keystores/{ks.id}")


@routes.get(_KS)
async def show_keystore(c: Ctx) -> web.Response:
    from server.console.lists import listing
    from server.keys.listing import SORTS, search_keys
    ks = await keystore_of(c)
    lst = listing(c.request.query, SORTS)
    keys, lst.total = await search_keys(c.rt.storage, ks.id, text=lst.q, sort=lst.sort, desc=lst.desc,
                                        page=lst.page, page_size=lst.size)
    pending = await _pending(c, ks.id)
    return render(c, "keystore.html", ks=ks, keys=keys, tab="keys", pending=pending, lst=lst,
                  base=f"/console/keystores/{ks.id}")


@routes.post(_KS + "/delete", roles=("admin",))
async def delete_keystore(c: Ctx) -> web.Response:
    """Delete an empty key store (409 while it holds keys); a change request when approval is on."""
    ks = await keystore_of(c)
    if form_str(c, "confirm_name", limit=200) != ks.name:
        from server.errors import InvalidRequest
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


@routes.post(_KS + "/settings", roles=("admin",))
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

