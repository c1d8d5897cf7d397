"""The key service's background jobs: purge keys whose deletion date has passed, rotate keys that are due.

The key server runs them on a timer, one replica at a time (server/app.py, run_jobs_once).
"""
from __future__ import annotations

import datetime as dt

from server import timeutil
from server.keys.lifecycle import Lifecycle

ROTATOR = "SECURE_KEY_MANAGER"        # the actor auto-rotations are recorded under


async def purge_due(life: Lifecycle, now: dt.datetime | None = None) -> int:
    rows = await life.ctx.db.fetchall("SELECT id, keystore_id FROM keys WHERE status = 'SCHEDULED_DELETION' "
                                      "AND deletion_at <= ?", timeutil.to_db(now or timeutil.now()))
    for r in rows:
        await life.purge(r["id"], r["keystore_id"])
    return len(rows)


async def rotate_due(life: Lifecycle, now: dt.datetime | None = None) -> int:
    rows = await life.ctx.db.fetchall("SELECT * FROM keys WHERE status = 'ACTIVE' AND next_rotation_at IS NOT NULL "
                                      "AND next_rotation_at <= ?", timeutil.to_db(now or timeutil.now()))
    done = 0
    for r in rows:
        key = await life.lookup.from_row(r)
        if not key.intact:
            continue                # refused at every use; its seal failure is logged and counted
        await life.rotate(key, actor=ROTATOR)
        done += 1
    return done
