"""The landing page: what needs an operator's attention now."""
from __future__ import annotations

import datetime as dt

from aiohttp import web

from server import timeutil
from server.console.web import ConsoleRoutes, Ctx, render, waiting_for
from server.errors import SKMError

routes = ConsoleRoutes()
ROTATION_DAYS = 7
CERT_DAYS = 30
DENIAL_HOURS = 24


def visible_store_ids(c: Ctx, stores) -> set[int]:
    """Stores this operator may see (a project-scoped operator: only those projects')."""
    scope = c.op.projects()
    return {s.id for s in stores if scope is None or s.project_id in scope}


async def _rotations(c: Ctx, names: dict[int, str]) -> list[dict]:
    due = timeutil.to_db(timeutil.now() + dt.timedelta(days=ROTATION_DAYS))
    rows = await c.rt.storage.fetchall(
        "SELECT id, name, keystore_id, next_rotation_at FROM keys WHERE status = 'ACTIVE' AND "
        "next_rotation_at IS NOT NULL AND next_rotation_at <= ? ORDER BY next_rotation_at LIMIT 200", due)
    now = timeutil.now_db()
    return [{"id": r["id"], "name": r["name"], "store": names[r["keystore_id"]], "storeId": r["keystore_id"],
             "at": r["next_rotation_at"], "overdue": r["next_rotation_at"] <= now}
            for r in rows if r["keystore_id"] in names][:50]


async def _certificates(c: Ctx, names: dict[int, str]) -> list[dict]:
    due = timeutil.to_db(timeutil.now() + dt.timedelta(days=CERT_DAYS))
    rows = await c.rt.storage.fetchall(
        "SELECT name, keystore_id, expires_at FROM auth_certificates WHERE status = 'ACTIVE' AND expires_at <= ? "
        "ORDER BY expires_at LIMIT 200", due)
    now = timeutil.now_db()
    return [{"name": r["name"], "store": names[r["keystore_id"]], "storeId": r["keystore_id"],
             "at": r["expires_at"], "expired": r["expires_at"] <= now} for r in rows if r["keystore_id"] in names][:50]


async def _denials(c: Ctx, names: dict[int, str]) -> list[dict]:
    audit = c.rt.audit
    if audit is None:
        return []
    since = timeutil.to_db(timeutil.now() - dt.timedelta(hours=DENIAL_HOURS))
    scope = c.op.projects()
    recs = await audit.query(result="denied", plane="data", since=since, newest_first=True, limit=5000,
                             project_ids=None if scope is None else list(scope))
    by: dict[int | None, dict] = {}
    for r in recs:
        ks = r.get("keyStoreId")
        if ks is not None and ks not in names:
            continue
        row = by.setdefault(ks, {"storeId": ks, "store": names.get(ks) or r["detail"].get("keyStoreName") or "",
                                 "count": 0, "last": r["time"], "reason": r.get("reason") or ""})
        row["count"] += 1
    return sorted(by.values(), key=lambda d: -d["count"])


def _last_backup(rt) -> dict | None:
    """The scheduled backups' last success (server/backup/schedule.py), when this server takes them."""
    from server.backup.schedule import STATE
    state = rt.extra.get(STATE)
    if state is None or state.last_success is None:
        return None
    import datetime as dt
    at = dt.datetime.fromtimestamp(state.last_success, dt.timezone.utc).replace(tzinfo=None)
    return {"lastSuccessAt": at.isoformat(timespec="seconds"), "sizeBytes": state.last_size}


@routes.get("/")
async def dashboard(c: Ctx) -> web.Response:
    stores = await c.rt.keys.keystores()
    seen = visible_store_ids(c, stores)
    names = {s.id: s.name for s in stores if s.id in seen}
    try:
        waiting = await waiting_for(c)
    except SKMError:
        waiting = []
    backup = _last_backup(c.rt)
    barrier = c.rt.barrier
    return render(c, "dashboard.html", waiting=waiting, stores=names,
                  rotations=await _rotations(c, names), certs=await _certificates(c, names),
                  denials=await _denials(c, names), backup=backup,
                  sealed=barrier.sealed, sealed_reason=barrier.sealed_reason,
                  system_key_version=barrier.current_version, key_versions=len(barrier.versions()),
                  rotation_days=ROTATION_DAYS, cert_days=CERT_DAYS, denial_hours=DENIAL_HOURS)
