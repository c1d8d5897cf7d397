"""The audit log viewer: filters, newest first, and the hash chain's status."""
from __future__ import annotations

from aiohttp import web

from server.console.web import ConsoleRoutes, Ctx, render
from server.errors import InvalidRequest, Unavailable

routes = ConsoleRoutes()
FILTERS = ("actor", "action", "plane", "result", "keyStoreId", "keyId", "since", "until")
RESULTS = ("ok", "denied", "refused", "error", "approval_required")
PLANES = ("mgmt", "data", "system")
PAGE = 100


@routes.get("/audit")
async def view(c: Ctx) -> web.Response:
    audit = c.rt.audit
    if audit is None:
        raise Unavailable("the audit log is not available on this server")
    from server.audit import parse_time
    q = {k: (c.request.query.get(k) or "").strip()[:128] for k in FILTERS}
    ks = q["keyStoreId"]
    if ks and not ks.isdigit():
        raise InvalidRequest("key store id must be a number")
    if q["plane"] and q["plane"] not in PLANES or q["result"] and q["result"] not in RESULTS:
        raise InvalidRequest("unknown plane or result filter")
    chain = await audit.verify()
    before = c.request.query.get("before", "")
    top = int(before) if before.isdigit() else chain.head_seq + 1
    # The query walks forward from a sequence number: page backwards in windows until PAGE records match.
    records: list[dict] = []
    lo, windows = top, 0
    while lo > 1 and len(records) < PAGE:
        start = max(0, lo - 1 - PAGE * 10)
        batch = await audit.query(since=parse_time(q["since"], "since"), until=parse_time(q["until"], "until"),
                                  actor=q["actor"] or None, plane=q["plane"] or None, key_id=q["keyId"] or None,
                                  keystore_id=int(ks) if ks else None, result=q["result"] or None,
                                  action=q["action"] or None, after_seq=start, limit=PAGE * 10)
        records += [r for r in batch if r["seq"] < lo][::-1]
        lo = start + 1
        windows += 1
        if windows >= 50:         # bound the work of one page view; the "older" link goes on
            break
    records = records[:PAGE]
    older = records[-1]["seq"] if len(records) == PAGE else (lo if lo > 1 else None)
    return render(c, "audit.html", records=records, q=q, chain=chain, older=older, results=RESULTS,
                  planes=PLANES)
