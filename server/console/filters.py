"""Jinja filters of the console (display only)."""
from __future__ import annotations

import json


def _when(v) -> str:
    """API time 2025-01-25T12:00:00 or DB time ...Z -> '2025-01-25 12:00:00 UTC'."""
    if not v:
        return "—"
    s = str(v).replace("T", " ").rstrip("Z")
    return s.split(".")[0] + " UTC"


def _compact(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def install_filters(env) -> None:
    env.filters["when"] = _when
    env.filters["compact"] = _compact
