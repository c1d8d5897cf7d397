"""Every change to a key store, its keys or its auth data goes through ChangeGate.

A change is an operation name and JSON-able parameters, so a key store that
requires approval can hold it as a change request and apply it later, exactly
as it would have been applied now. `apply` is the single dispatcher.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from server.errors import ApprovalUnavailable, InvalidRequest
from server.keys.model import Key, KeyStore

Op = Callable[["ChangeGate", dict, str], Awaitable[Any]]
OPS: dict[str, Op] = {}


def op(name: str):
    def deco(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return deco


class ChangeGate:
    def __init__(self, keys, authdata, certificates=None, approvals=None) -> None:
        self.keys = keys                  # KeyService
        self.authdata = authdata          # AuthData
        self.certificates = certificates  # server.access.certificates.Certificates
        self.approvals = approvals        # server.access.approvals.Approvals (issue: approval workflow)

    async def submit(self, actor: str, ks: KeyStore | None, name: str, params: dict) -> Any:
        """Apply now, or hold as a change request when the key store requires approval."""
        if name not in OPS:
            raise InvalidRequest(f"unknown change {name}")
        if ks is not None and ks.approval_required:
            if self.approvals is None:
                # Fail closed: approval is on but nothing can approve.
                raise ApprovalUnavailable("approval is required but the approval workflow is not available")
            await self.approvals.request(actor, ks, name, params)   # raises ApprovalRequired
        return await self.apply(name, params, actor)

    async def submit_key_op(self, actor: str, ks: KeyStore, name: str, key: Key, params: dict | None = None) -> Any:
        return await self.submit(actor, ks, name, {"key_id": key.id, **(params or {})})

    async def apply(self, name: str, params: dict, actor: str) -> Any:
        return await OPS[name](self, params, actor)


async def _key(g: ChangeGate, p: dict) -> Key:
    return await g.keys.key(p["key_id"])


@op("keystore.update")
async def _ks_update(g: ChangeGate, p: dict, actor: str):
    ks = await g.keys.keystore(p["keystore_id"])
    return await g.keys.update_keystore(ks, actor=actor, **p["changes"])


@op("key.create")
async def _key_create(g: ChangeGate, p: dict, actor: str):
    ks = await g.keys.keystore(p["keystore_id"])
    return await g.keys.create_key(ks, p["key_type"], p["name"], p.get("description", ""), actor=actor,
                                   key_spec=p.get("key_spec"), auto_rotation_days=p.get("auto_rotation_days", 0),
                                   exportable=p.get("exportable", False), secret_value=p.get("secret_value"))


@op("key.update")
async def _key_update(g: ChangeGate, p: dict, actor: str):
    return await g.keys.update_key(await _key(g, p), actor=actor, description=p.get("description"),
                                   auto_rotation_days=p.get("auto_rotation_days"))


@op("key.rotate")
async def _key_rotate(g: ChangeGate, p: dict, actor: str):
    return await g.keys.rotate(await _key(g, p), actor=actor, new_secret=p.get("secretValue"))


@op("update_secret")
async def _update_secret(g: ChangeGate, p: dict, actor: str):
    return await g.keys.update_secret(await _key(g, p), p["secretValue"], actor=actor)


@op("key.schedule_deletion")
async def _key_schedule(g: ChangeGate, p: dict, actor: str):
    return await g.keys.schedule_deletion(await _key(g, p), actor=actor)


@op("key.cancel_deletion")
async def _key_cancel(g: ChangeGate, p: dict, actor: str):
    return await g.keys.cancel_deletion(await _key(g, p), actor=actor)


@op("key.delete")
async def _key_delete(g: ChangeGate, p: dict, actor: str):
    return await g.keys.delete_now(await _key(g, p), actor=actor)


async def _ks(g: ChangeGate, p: dict) -> KeyStore:
    return await g.keys.keystore(p["keystore_id"])


@op("auth.add")
async def _auth_add(g: ChangeGate, p: dict, actor: str):
    return await g.authdata.add(await _ks(g, p), p["kind"], p["value"], p.get("description", ""), actor=actor)


@op("auth.schedule_deletion")
async def _auth_schedule(g: ChangeGate, p: dict, actor: str):
    return await g.authdata.schedule_deletion(await _ks(g, p), p["kind"], p["value"], actor=actor)


@op("auth.cancel_deletion")
async def _auth_cancel(g: ChangeGate, p: dict, actor: str):
    return await g.authdata.cancel_deletion(await _ks(g, p), p["kind"], p["value"], actor=actor)


@op("auth.delete")
async def _auth_delete(g: ChangeGate, p: dict, actor: str):
    return await g.authdata.delete_now(await _ks(g, p), p["kind"], p["value"], actor=actor)


@op("keystore.delete")
async def _ks_delete(g: ChangeGate, p: dict, actor: str):
    from server.keys.keystore_delete import delete_keystore
    return await delete_keystore(g.keys, await _ks(g, p), actor=actor)
