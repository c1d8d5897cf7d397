"""The audit log viewer: filters (changes only, semantic actions), newest first, export, the chain's status."""
from __future__ import annotations

import csv
import io
import json

from aiohttp import web

from server.api.params import ID_MAX, parse_int
from server.audit.actions import check_filter
from server.console.web import SECURITY_HEADERS, ConsoleRoutes, Ctx, render
from server.errors import InvalidRequest, Unavailable

routes = ConsoleRoutes()
FILTERS = ("actor", "action", "plane", "result", "keyStoreId", "keyId", "since", "until", "changes")
RESULTS = ("ok", "denied", "refused", "error", "approval_required")
PLANES = ("mgmt", "data", "system", "sidecar")
PAGE = 100
EXPORT_MAX = 10_000
CSV_FIELDS = ("seq", "time", "plane", "actor", "actorKind", "action", "change", "result", "status", "projectId",
              "keyStoreId", "keyStoreName", "keyId", "keyName", "ip", "reason")


def audit_of(c: Ctx):
    if c.rt.audit is None:
        raise Unavailable("the audit log is not available on this server")
    return c.rt.audit


def filters(c: Ctx, **fixed: str) -> dict:
    q = {k: (c.request.query.get(k) or "").strip()[:128] for k in FILTERS}
    q.update(fixed)
    if q["keyStoreId"]:
        parse_int(q["keyStoreId"], "key store id", 0, ID_MAX)
    if q["plane"] and q["plane"] not in PLANES or q["result"] and q["result"] not in RESULTS:
        raise InvalidRequest("unknown plane or result filter")
    if q["action"]:
        why = check_filter(q["action"])      # a mistyped action is said, not answered with an empty page
        if why:
            raise InvalidRequest(why)
    q["changes"] = "1" if q["changes"] in ("1", "on", "true") else ""
    return q


async def records(c: Ctx, q: dict, *, before: int | None, limit: int) -> list[dict]:
    from server.audit import parse_time
    scope = c.op.projects()
    recs = await audit_of(c).query(
        since=parse_time(q["since"], "since"), until=parse_time(q["until"], "until"), actor=q["actor"] or None,
        plane=q["plane"] or None, key_id=q["keyId"] or None,
        keystore_id=int(q["keyStoreId"]) if q["keyStoreId"] else None, result=q["result"] or None,
        action=q["action"] or None, changes=bool(q["changes"]), before_seq=before, newest_first=True, limit=limit,
        project_ids=None if scope is None else list(scope))
    return recs


def _before(c: Ctx) -> int | None:
    b = c.request.query.get("before", "")
    return int(b) if (b.isascii() and b.isdigit()) and len(b) < 19 else None


@routes.get("/audit")
async def view(c: Ctx) -> web.Response:
    q = filters(c)
    chain = await audit_of(c).verify()
    recs = await records(c, q, before=_before(c), limit=PAGE)
    older = recs[-1]["seq"] if len(recs) == PAGE else None
    return render(c, "audit.html", records=recs, q=q, chain=chain, older=older, results=RESULTS, planes=PLANES,
                  export_query={k: v for k, v in q.items() if v})


@routes.get("/audit/export")
async def export(c: Ctx) -> web.Response:
    """The filtered view as CSV or JSON lines (newest first, at most EXPORT_MAX records)."""
    fmt = c.request.query.get("format", "csv")
    if fmt not in ("csv", "jsonl"):
        raise InvalidRequest("format is csv or jsonl")
    q = filters(c)
    recs = await records(c, q, before=_before(c), limit=EXPORT_MAX)
    if fmt == "jsonl":
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
        ctype = "application/x-ndjson"
    else:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(CSV_FIELDS)
        for r in recs:
            d = r.get("detail") or {}
            row = {**r, "keyStoreName": d.get("keyStoreName"), "keyName": d.get("keyName")}
            # A cell starting with = + - @ would be a formula in a spreadsheet: quote it as text.
            w.writerow([_cell(row.get(f)) for f in CSV_FIELDS])
        body, ctype = out.getvalue(), "text/csv"
    return web.Response(text=body, content_type=ctype, charset="utf-8", headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="skm-audit.{fmt}"'})


def _cell(v) -> str:
    if v is None:
        return ""
    s = str(v).lower() if isinstance(v, bool) else str(v)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s
