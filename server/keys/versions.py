"""Key version lifecycle: disable a version (decrypt/verify/export with it refused) and enable it again.

Disabling is gated on the roll-out (server/keys/rollout.py): while a host's last report holds the
version, disabling it would cut that host's apps off, so it is refused unless forced. A stale host
(silent past its TTL) blocks too: silence does not mean it stopped serving the version.
The current version is never disabled (rotate first). Both are key changes and go through the
ChangeGate, so a key store that requires approval holds them as change requests; the roll-out gate
is checked when the change is applied.

A disabled version keeps its material (re-enabling restores it exactly); its status is
`DISABLED` in key_versions (sealed: server/access/seal.py), and every key-server process drops
that key's loaded versions on the `key_version_disabled` event (KeyService.forget_material,
server/keys/crypto.py), so the next use reads the status.
"""
from __future__ import annotations

from server.access.changes import ChangeGate, op
from server.errors import Conflict, InvalidKeyVersion
from server.events import Event
from server.keys import rollout
from server.keys.model import Key

DISABLED, ACTIVE = "DISABLED", "ACTIVE"


async def _status(keys, key: Key, version: int) -> str:
    row = await keys.db.fetchone("SELECT status FROM key_versions WHERE key_id = ? AND version = ?", key.id, version)
    if row is None:
        raise InvalidKeyVersion(f"key {key.id} has no version {version} (versions 0 to {key.current_version})")
    return row["status"]


def _out(key: Key, version: int, status: str, changed: bool, **extra) -> dict:
    return {"keyId": key.id, "keyVersion": version, "status": status, "changed": changed, **extra}


async def disable(keys, key: Key, version: int, *, actor: str, force: bool = False) -> dict:
    if version == key.current_version:
        raise Conflict(f"version {version} is the current version of key {key.id}; rotate the key first, then "
                       "disable the old version")
    status = await _status(keys, key, version)
    if status == DISABLED:
        return _out(key, version, DISABLED, False)
    holders = await rollout.holders(keys.db, key.id, version)
    if holders and not force:
        names = ", ".join(h.host + (" (stale)" if h.stale else "") for h in holders[:5]) + (
            f" and {len(holders) - 5} more" if len(holders) > 5 else "")
        stale = sum(1 for h in holders if h.stale)
        why = (f"; a stale host has not reported within its TTL and may still serve it: bring it back (its "
               "sidecar reports what it holds when it starts)" if stale else "")
        raise Conflict(f"version {version} is still held by {len(holders)} host(s): {names}{why}; wait until "
                       f"they acknowledge version {key.current_version} (skm key rollout {key.id}), or use --force")
    # Only narrows: made on a row failing its seal too, which keeps failing (no enabling it back).
    n = await keys.ctx.seal.update(keys.db, "key_versions", "key_id = ? AND version = ? AND status = 'ACTIVE'",
                                   (key.id, version), {"status": DISABLED}, check=False)
    keys.forget_material(key.id)
    await keys.events.publish(Event(key.keystore_id, "key_version_disabled", key.id, version))
    return _out(key, version, DISABLED, n == 1, forced=bool(force and holders),
                heldBy=[h.host for h in holders][:100])


async def enable(keys, key: Key, version: int, *, actor: str) -> dict:
    status = await _status(keys, key, version)
    if status == ACTIVE:
        return _out(key, version, ACTIVE, False)
    if status != DISABLED:
        raise Conflict(f"version {version} is {status}; only a disabled version can be enabled")
    n = await keys.ctx.seal.update(keys.db, "key_versions", "key_id = ? AND version = ? AND status = 'DISABLED'",
                                   (key.id, version), {"status": ACTIVE})
    keys.forget_material(key.id)
    await keys.events.publish(Event(key.keystore_id, "key_version_enabled", key.id, version))
    return _out(key, version, ACTIVE, n == 1)


@op("key.version_disable")
async def _disable_op(g: ChangeGate, p: dict, actor: str):
    key = await g.keys.key(p["key_id"])
    return await disable(g.keys, key, int(p["version"]), actor=actor, force=bool(p.get("force")))


@op("key.version_enable")
async def _enable_op(g: ChangeGate, p: dict, actor: str):
    key = await g.keys.key(p["key_id"])
    return await enable(g.keys, key, int(p["version"]), actor=actor)
