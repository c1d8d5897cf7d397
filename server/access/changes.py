"""Every change to a key store, its keys or its auth data goes through ChangeGate.

A change is an operation name and JSON-able parameters, so a key store that
requires approval can hold it as a change request and apply it later, exactly
as it would have been applied now. `apply` is the single dispatcher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server import text
from server.access.ops import OPS, op  # noqa: F401  (re-exported: where the change modules register)
from server.errors import ApprovalUnavailable, BarrierError, Forbidden, InvalidRequest
from server.keys.model import Key, KeyStore


@dataclass(frozen=True)
class Requester:
    """Who asks for a change: the name records show, the operator behind it (whatever credential
    acted: operator token, user access key, bearer token) and that credential."""
    name: str
    operator: Any = None               # server.access.operators.Operator, or None (no operator identity)
    credential: str | None = None      # "token:<id>", "accesskey:<id>", "bearer:<id>"


def requester(actor: Any) -> Requester:
    """A Requester from an Operator, a client-API context (it carries `caller` and `operator`), or a name."""
    if isinstance(actor, Requester):
        return actor
    from server.access.operators import Operator
    if isinstance(actor, Operator):
        return Requester(actor.name, actor, f"token:{actor.token_id}" if actor.token_id else None)
    if hasattr(actor, "caller"):
        return Requester(actor.caller, getattr(actor, "operator", None), getattr(actor, "credential", None))
    return Requester(str(actor))


class ChangeGate:
    def __init__(self, keys, authdata, certificates=None, approvals=None) -> None:
        self.keys = keys                  # KeyService
        self.authdata = authdata          # AuthData
        self.certificates = certificates  # server.access.certificates.Certificates
        self.approvals = approvals        # server.access.approvals.Approvals (issue: approval workflow)
        self.operators = None             # server.access.operators.Operators (operator management changes)
        self.callers = None               # server.access.callers.CallerAuth

    async def submit(self, actor: Any, ks: KeyStore | None, name: str, params: dict) -> Any:
        """Apply now, or hold as a change request when the key store requires approval.

        `actor`: an Operator, a client-API context or a plain name (see `requester`)."""
        if name not in OPS:
            raise InvalidRequest(f"unknown change {name}")
        who = requester(actor)
        text.check_params(params)        # before a change is held for approval, not only when applied
        if ks is not None and not ks.intact:
            # Whether its changes need approvers is part of what was edited: change nothing.
            raise BarrierError("this key store's settings were changed outside the key server, so no change to it "
                               "is made; restore the database from a backup (docs/disaster-recovery.md)")
        if ks is not None and ks.approval_required:
            if self.approvals is None:
                # Fail closed: approval is on but nothing can approve.
                raise ApprovalUnavailable("approval is required but the approval workflow is not available")
            await self.approvals.request(who, ks, name, params)   # raises ApprovalRequired
        return await self.apply(name, params, who.name)

    async def submit_operator_change(self, actor: Any, name: str, params: dict) -> Any:
        """Operator management: a change request for another global admin when `[approvals] operators`
        is on, else applied now."""
        who = requester(actor)
        if who.operator is None:
            raise Forbidden("operator management needs an operator")
        params = {**params, "requester_id": who.operator.id}
        if self.approvals is not None and self.approvals.settings.operators:
            await self.approvals.request(who, None, name, params)   # raises ApprovalRequired
        return await self.apply(name, params, who.name)

    async def submit_key_op(self, actor: Any, ks: KeyStore, name: str, key: Key, params: dict | None = None) -> Any:
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
