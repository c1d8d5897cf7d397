"""Usage plots: client requests and denials over time, drawn as server-rendered SVG (no script, strict CSP)."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt.usage_routes import usage_for
from server.console.keystores import _pending, keystore_of
from server.console.web import ConsoleRoutes, Ctx, render
from server.usage import RANGES

routes = ConsoleRoutes()
_KS = r"/keystores/{keystore_id:\d{1,12}}"
W, H, PAD_L, PAD_B, PAD_T = 1000, 240, 44, 22, 10
LABELS = {"hour": "last hour", "day": "last 24 hours", "month": "last 30 days"}


def chosen_range(c: Ctx, name: str = "range") -> str:
    r = c.request.query.get(name, "day")
    return r if r in RANGES else "day"


def chart(series: dict) -> dict:
    """Bar geometry for the template: stacked ok / error / denied per bucket, a y scale, a few x labels."""
    buckets = series["buckets"]
    top = max([b["ok"] + b["denied"] + b["error"] for b in buckets] + [1])
    # A round scale: the smallest 1, 2 or 5 x 10^n at or above the tallest bar.
    scale, n = 1, 1
    while scale < top:
        for m in (1, 2, 5):
            if m * n >= top:
                scale = m * n
                break
        else:
            n *= 10
    inner_w, inner_h = W - PAD_L - 4, H - PAD_B - PAD_T
    slot = inner_w / max(1, len(buckets))
    bw = max(1.0, slot * 0.8)
    bars = []
    for i, b in enumerate(buckets):
        x = PAD_L + i * slot + (slot - bw) / 2
        y = PAD_T + inner_h
        parts = []
        for kind in ("ok", "error", "denied"):
            h = b[kind] / scale * inner_h
            if h > 0:
                y -= h
                parts.append({"kind": kind, "y": round(y, 1), "h": round(max(h, 0.5), 1)})
        title = f"{b['start'].replace('T', ' ')} UTC: {b['ok']} ok, {b['denied']} denied, {b['error']} failed"
        bars.append({"x": round(x, 1), "w": round(bw, 1), "parts": parts, "title": title})
    step = max(1, len(buckets) // 6)
    xlabels = []
    for i in range(0, len(buckets), step):
        s = buckets[i]["start"]
        text = s[5:10] if series["bucketMinutes"] >= 1440 else s[11:16]
        xlabels.append({"x": round(PAD_L + i * slot, 1), "text": text})
    return {"w": W, "h": H, "left": PAD_L, "top": PAD_T, "base": PAD_T + inner_h, "right": W - 4,
            "max": scale, "mid": round(PAD_T + inner_h / 2, 1), "half": scale / 2, "bars": bars, "xlabels": xlabels,
            "totals": series["totals"], "label": LABELS[series["range"]], "range": series["range"]}


async def chart_for(c: Ctx, *, keystore_id: int | None = None, key_id: str | None = None,
                    range_: str = "day") -> dict | None:
    if c.rt.extra.get("usage") is None:
        return None
    return chart(await usage_for(c.rt, c.op, range_=range_, keystore_id=keystore_id, key_id=key_id))


@routes.get(_KS + "/usage")
async def keystore_usage(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    rng = chosen_range(c)
    return render(c, "usage.html", ks=ks, tab="usage", pending=await _pending(c, ks.id),
                  chart=await chart_for(c, keystore_id=ks.id, range_=rng), ranges=list(RANGES))
