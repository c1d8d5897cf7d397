"""Keys of a key store: create each type, detail with versions, rotate, deletion, secret reveal (audited)."""
from __future__ import annotations

from aiohttp import web

from server.console.keystores import keystore_of
from server.console.web import PREFIX, ConsoleRoutes, Ctx, form_bool, form_int, form_str, render, see_other
from server.errors import ApprovalRequired, InvalidKeyId, InvalidKeyType, InvalidRequest, SKMError
from server.keys.model import MAX_SECRET_BYTES, SPECS, KeyType
from server.runtime import ERROR, KEY

routes = ConsoleRoutes()
_KS = r"/keystores/{keystore_id:\d{1,12}}"
_KEY = r"/keys/{key_id:[0-9a-f]{32}}"
TYPES = [(KeyType.SECRET.value, "Secret", "A value your application reads (a password, an API key)."),
         (KeyType.SYMMETRIC_KEY.value, "Symmetric key", "AES-256-GCM: encrypt, decrypt, envelope keys."),
         (KeyType.ASYMMETRIC_KEY.value, "Asymmetric key", "RSA / EC / Ed25519: sign and verify.")]
SPEC_CHOICES = {t.value: list(SPECS[t]) for t in KeyType}


def _form(c: Ctx, ks, *, status: int = 200, values: dict | None = None, error: SKMError | None = None):
    return render(c, "key_form.html", status=status, ks=ks, types=TYPES, specs=SPEC_CHOICES, values=values or {},
                  error=error, max_secret=MAX_SECRET_BYTES)


@routes.get(_KS + "/keys/new", roles=("admin",), per_project=True)
async def new_key(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    return _form(c, ks, values={"key_type": c.request.query.get("type", "SECRET")})


@routes.post(_KS + "/keys/new", roles=("admin",), per_project=True)
async def create_key(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    kt = form_str(c, "key_type", limit=32)
    values = {"key_type": kt, "name": form_str(c, "name", limit=200).strip(),
              "description": form_str(c, "description", limit=2000), "exportable": form_bool(c, f"exportable_{kt}"),
              "key_spec": form_str(c, f"key_spec_{kt}", limit=32) or None}
    try:
        values["auto_rotation_days"] = form_int(c, f"auto_rotation_days_{kt}", 0, 0, 3650,
                                              "Auto-rotation period")
        params = {"keystore_id": ks.id, **values}
        if kt == KeyType.SECRET.value:
            params["secret_value"] = form_str(c, "secret_value", limit=MAX_SECRET_BYTES + 1)
            if not params["secret_value"]:
                raise InvalidRequest("a secret needs a value")
            params["key_spec"] = None
        key = await c.rt.changes.submit(c.op, ks, "key.create", params)
    except ApprovalRequired:
        raise
    except SKMError as e:
        c.request[ERROR] = e
        return _form(c, ks, status=e.status, values=values, error=e)
    c.flash("ok", f"Key {key.name!r} created.")
    return see_other(f"{PREFIX}/keys/{key.id}")


async def _key(c: Ctx, versions: bool = False):
    key = await c.rt.keys.key(c.match("key_id"), with_versions=versions)
    ks = await c.rt.keys.keystore(key.keystore_id)
    c.in_scope(ks.project_id, InvalidKeyId("no key with that id"))   # another project's: as if it did not exist
    c.request[KEY] = key
    return key, ks


async def _detail(c: Ctx, key, ks, *, revealed: str | None = None, status: int = 200) -> web.Response:
    from server.console.connect import connection
    from server.console.usage import chart_for, chosen_range
    from server.keys import rollout
    return render(c, "key.html", status=status, key=key, ks=ks, revealed=revealed,
                  rollout=await rollout.rollout(c.rt.storage, key.id, key.current_version),
                  conn=await connection(c, ks, key),
                  chart=await chart_for(c, key_id=key.id, range_=chosen_range(c)), tab="overview")


@routes.get(_KEY + "/activity")
async def activity(c: Ctx) -> web.Response:
    """The key's own audit records (every action on it, newest first)."""
    from server.console.audit import PAGE, _before, filters, records
    key, ks = await _key(c)
    q = filters(c, keyId=key.id)
    recs = await records(c, q, before=_before(c), limit=PAGE)
    return render(c, "key_activity.html", key=key, ks=ks, records=recs, q=q, tab="activity",
                  older=recs[-1]["seq"] if len(recs) == PAGE else None)


@routes.get(_KEY)
async def show_key(c: Ctx) -> web.Response:
    key, ks = await _key(c, versions=True)
    return await _detail(c, key, ks)


@routes.post(_KEY + "/reveal", roles=("admin",), per_project=True)
async def reveal(c: Ctx) -> web.Response:
    """Show a SECRET's value once, in this response only; recorded as `key.reveal` in the audit log."""
    from server.audit import AUDIT_ACTION
    c.request[AUDIT_ACTION] = "key.reveal"
    key, ks = await _key(c, versions=True)
    if key.key_type is not KeyType.SECRET:
        raise InvalidKeyType("only a SECRET has a value to reveal")
    return await _detail(c, key, ks, revealed=await c.rt.keys.secret_value(key))


async def _key_change(c: Ctx, op_name: str, done: str, params: dict | None = None) -> web.Response:
    key, ks = await _key(c)
    await c.rt.changes.submit_key_op(c.op, ks, op_name, key, params)
    c.flash("ok", done)
    return see_other(f"{PREFIX}/keys/{key.id}" if op_name != "key.delete" else f"{PREFIX}/keystores/{ks.id}")


@routes.post(_KEY + "/rotate", roles=("admin",), per_project=True)
async def rotate(c: Ctx) -> web.Response:
    params = {}
    value = form_str(c, "secret_value", limit=MAX_SECRET_BYTES + 1)
    if value:
        params["secretValue"] = value
    return await _key_change(c, "key.rotate", "Rotated: a new version is now the primary one.", params)


@routes.post(_KEY + "/schedule-deletion", roles=("admin",), per_project=True)
async def schedule_deletion(c: Ctx) -> web.Response:
    return await _key_change(c, "key.schedule_deletion",
                             "Deletion scheduled. The key is out of service until the deletion is cancelled.")


@routes.post(_KEY + "/cancel-deletion", roles=("admin",), per_project=True)
async def cancel_deletion(c: Ctx) -> web.Response:
    return await _key_change(c, "key.cancel_deletion", "Deletion cancelled: the key is in service again.")


@routes.post(_KEY + "/delete", roles=("admin",), per_project=True)
async def delete(c: Ctx) -> web.Response:
    return await _key_change(c, "key.delete", "The key and all its versions were deleted.")


@routes.post(_KEY + "/edit", roles=("admin",), per_project=True)
async def edit(c: Ctx) -> web.Response:
    days = form_int(c, "auto_rotation_days", 0, 0, 3650, "Auto-rotation period")
    return await _key_change(c, "key.update", "Saved.", {"description": form_str(c, "description", limit=2000),
                                                          "auto_rotation_days": days})
