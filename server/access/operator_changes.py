"""Operator management as changes: with `[approvals] operators = true` each of these waits as a
change request that another global admin approves (server/access/approvals.py); otherwise the
ChangeGate applies it at once. Every one records its lineage (who created, granted, handed a
credential) so separation of duties can follow it.

A credential made for someone else (an operator token, a user access key) is returned at once
when no approval is needed, else sealed on the applied request for the requester to collect once.
"""
from __future__ import annotations

from server.access.changes import ChangeGate, op


async def _by(g: ChangeGate, p: dict):
    return await g.operators.by_id(int(p["requester_id"]))


@op("operator.create")
async def _create(g: ChangeGate, p: dict, actor: str):
    by = await _by(g, p)
    await g.operators.create(p["name"], p["role"], password=p.get("password"), project_id=p.get("project_id"), by=by)
    return await g.operators.describe(p["name"])


@op("operator.grant")
async def _grant(g: ChangeGate, p: dict, actor: str):
    return await g.operators.grant(p["name"], p["role"], p.get("project_id"), by=await _by(g, p))


@op("operator.password")
async def _password(g: ChangeGate, p: dict, actor: str):
    return await g.operators.update(p["name"], password=p["password"], by=await _by(g, p))


@op("operator.token")
async def _token(g: ChangeGate, p: dict, actor: str):
    owner = await g.operators.by_name(p["name"])
    token = await g.operators.issue_token(owner, p.get("description", ""), ttl_days=p.get("ttl_days"),
                                          by=await _by(g, p))
    return {"operator": owner.name, "tokenId": token.split("_", 2)[1], "_collect": {"token": token}}


@op("accesskey.create")
async def _access_key(g: ChangeGate, p: dict, actor: str):
    by = await _by(g, p)
    owner = await g.operators.by_name(p["name"])
    key, secret = await g.callers.create_key(owner, actor=by.name, description=p.get("description", ""),
                                             project_id=p.get("project_id"), ttl_days=p.get("ttl_days"))
    await g.operators.record_custody(owner.id, by, "access_key")
    return {**key.to_api(), "_collect": {"accessKeyId": key.id, "secretAccessKey": secret}}
