"""Rotation roll-out: which version of a key each sidecar host holds, as the hosts acknowledge it.

A sidecar reports, per key it serves (or renders), the version it last delivered, when, and whether
the reload action that followed succeeded. A host is its certificate (SHA-256 fingerprint; the name
shown is the certificate's common name, the MAC the one its certificate attests). Each report
carries the host's own TTL, its promise to report again within it: a host silent for longer is
*stale*, shown but not trusted to still hold what it last said (it may be stopped, or cut off).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from server import timeutil
from server.storage.base import Executor, Storage

MIN_TTL, MAX_TTL = 2, 86_400          # seconds a host's report may claim to stay current
# A host silent this long is gone (its longest promise is a day): its rows are dropped, so hosts that come and
# go (autoscaling, re-issued certificates) do not grow the table and every roll-out view without end.
RETENTION = dt.timedelta(days=30)


@dataclass(frozen=True)
class Host:
    """A sidecar host as the key server saw it on this connection."""
    fingerprint: str                   # SHA-256 of its certificate (DER), hex
    name: str                          # the certificate's common name
    mac: str | None                    # the claimed MAC when the certificate binds it (attested), else None


@dataclass(frozen=True)
class Ack:
    key_id: str
    version: int
    delivered_at: str | None           # database time form; the sidecar's clock
    reload_ok: bool | None             # None: no reload action ran for this key


@dataclass(frozen=True)
class Holding:
    host: str
    fingerprint: str
    mac: str | None
    version: int
    delivered_at: str | None
    acked_at: str
    ttl: int
    reload_ok: bool | None
    stale: bool

    def to_api(self) -> dict:
        return {"host": self.host, "fingerprint": self.fingerprint, "mac": self.mac, "version": self.version,
                "deliveredDatetime": timeutil.to_api(self.delivered_at),
                "ackDatetime": timeutil.to_api(self.acked_at), "ttlSeconds": self.ttl,
                "reloadOk": self.reload_ok, "stale": self.stale}


async def record(storage: Storage, project_id: int, host: Host, acks: list[Ack], ttl: int, *,
                 complete: bool = False, reported: set[str] = frozenset()) -> int:
    """Upsert one host's acknowledgements (one row per host and key, one transaction); returns the count.

    `complete`: the report is everything this host holds in the project (a sidecar's whole set, sent at
    start and as its heartbeat), so the host's rows for other keys go: a sidecar restarted with an empty
    cache no longer counts as holding what its previous run delivered. `reported`: key ids in the report
    that were refused (their rows stay: refusing a holding does not mean the host dropped it)."""
    now = timeutil.now_db()
    async with storage.transaction() as tx:
        if complete:
            held = sorted({a.key_id for a in acks} | set(reported))
            marks = ", ".join("?" for _ in held)
            await tx.execute("DELETE FROM key_holdings WHERE host_fp = ? AND project_id = ?"
                             + (f" AND key_id NOT IN ({marks})" if held else ""),
                             host.fingerprint, project_id, *held)
        for a in acks:
            await tx.execute(
                "INSERT INTO key_holdings (host_fp, key_id, project_id, host_name, mac, version, delivered_at, "
                "acked_at, ttl_seconds, reload_ok) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host_fp, key_id) DO UPDATE SET project_id = excluded.project_id, "
                "host_name = excluded.host_name, mac = excluded.mac, version = excluded.version, "
                "delivered_at = excluded.delivered_at, acked_at = excluded.acked_at, "
                "ttl_seconds = excluded.ttl_seconds, reload_ok = excluded.reload_ok",
                host.fingerprint, a.key_id, project_id, host.name[:200], host.mac, a.version, a.delivered_at, now,
                ttl, None if a.reload_ok is None else int(a.reload_ok))
    return len(acks)


async def prune(db: Executor, now: dt.datetime | None = None) -> int:
    """Drop the holdings of hosts silent for longer than RETENTION; returns how many rows went."""
    return await db.execute("DELETE FROM key_holdings WHERE acked_at < ?",
                            timeutil.to_db((now or timeutil.now()) - RETENTION))


def _holding(r: dict, now: dt.datetime) -> Holding:
    acked = timeutil.from_db(r["acked_at"])
    stale = (now - acked).total_seconds() > int(r["ttl_seconds"])
    return Holding(r["host_name"], r["host_fp"], r["mac"], int(r["version"]), r["delivered_at"], r["acked_at"],
                   int(r["ttl_seconds"]), None if r["reload_ok"] is None else bool(r["reload_ok"]), stale)


async def holdings(db: Executor, key_id: str, now: dt.datetime | None = None) -> list[Holding]:
    rows = await db.fetchall("SELECT * FROM key_holdings WHERE key_id = ? ORDER BY host_name, host_fp", key_id)
    now = now or timeutil.now()
    return [_holding(r, now) for r in rows]


async def holders(db: Executor, key_id: str, version: int) -> list[Holding]:
    """Hosts whose last report holds `version`, stale ones included: what a version disable must wait for.

    A stale host is not known to be gone: it may be cut off from the key server and still serving
    that version to its apps, so it blocks too, until it reports again (a restarted sidecar's first
    report replaces what it held before) or is dropped after RETENTION, or the disable is forced."""
    rows = await db.fetchall("SELECT * FROM key_holdings WHERE key_id = ? AND version = ? ORDER BY host_name",
                             key_id, version)
    now = timeutil.now()
    return [_holding(r, now) for r in rows]


def summarize(current_version: int, hs: list[Holding]) -> dict:
    """`version 3 on 12 of 14 hosts`: hosts reporting the current version, of all hosts known for the key."""
    on = sum(1 for h in hs if h.version == current_version and not h.stale)
    stale = sum(1 for h in hs if h.stale)
    by_version: dict[int, int] = {}
    for h in hs:
        if not h.stale:
            by_version[h.version] = by_version.get(h.version, 0) + 1
    text = f"version {current_version} on {on} of {len(hs)} host{'s' if len(hs) != 1 else ''}"
    if stale:
        text += f" ({stale} stale)"
    return {"currentVersion": current_version, "hostsOnCurrent": on, "hosts": len(hs), "staleHosts": stale,
            "versions": [{"version": v, "hosts": n} for v, n in sorted(by_version.items(), reverse=True)],
            "summary": text}


async def rollout(db: Executor, key_id: str, current_version: int) -> dict:
    hs = await holdings(db, key_id)
    return {"keyId": key_id, **summarize(current_version, hs), "hostList": [h.to_api() for h in hs]}
