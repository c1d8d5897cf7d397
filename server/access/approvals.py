"""The approval workflow: changes to an approval key store wait as change requests.

PENDING -> APPROVED -> APPLIED (or FAILED, with the reason) | DENIED | CANCELLED
(by the requester) | EXPIRED. Rules:

* only the approver role approves or denies, never the requester;
* a request needs `approvals_needed` distinct approvals (fixed when it is made);
* a store with approval on but too few eligible approvers refuses changes
  (fail closed: nothing is ever approved by default);
* secret parameters (secret values, passwords) are sealed by the barrier in
  `secrets_sealed`, never in the JSON, masked in the diff, and wiped once the
  request is decided;
* concurrent approvals apply a request once: every decision first updates the
  request row (a row lock on PostgreSQL, the single writer on SQLite) and the
  PENDING -> APPROVED step is a compare-and-set;
* requests and approvals are sealed rows (server/access/seal.py): what was asked,
  the diff approvers are shown, the requester, how many must agree and the status
  are as the key server wrote them, or the request is neither approved nor applied
  (it shows as INVALID); an approval written into the database does not count.

Approvers hear about new requests on the event stream (`approval_requested`)
and, when configured, through a webhook (JSON POST, retried, no secret values).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import ssl
from typing import Any

import aiohttp

from server import logs, text, timeutil
from server.access.changes import Requester
from server.access.lineage import Lineage
from server.access.operators import Operator
from server.barrier.barrier import sealed_aad
from server.errors import (ApprovalRequired, ApprovalUnavailable, BarrierError, Conflict, Forbidden, InvalidRequest,
                           NotFound, SKMError)
from server.events import Event
from server.keys.model import Key, KeyStore
from server.settings import ApprovalSettings   # [approvals] in the server config

log = logs.get("skm.approvals")

SECRET_FIELDS = frozenset({"secret_value", "secretValue", "password"})
MASKED_FIELDS = SECRET_FIELDS | {"password_sealed"}
MASK = "********"
STATUSES = ("PENDING", "APPROVED", "APPLIED", "FAILED", "DENIED", "CANCELLED", "EXPIRED")
TERMINAL = ("APPLIED", "FAILED", "DENIED", "CANCELLED", "EXPIRED")


def _aad(request_id: int) -> bytes:
    return sealed_aad("change_requests", "secrets_sealed", request_id)


def mask(value: Any) -> Any:
    """A copy with every secret-named field masked, at any depth (diff entries name theirs in "field")."""
    if isinstance(value, dict):
        if value.get("field") in MASKED_FIELDS:
            return {**value, "from": None, "to": MASK if value.get("to") is not None else None}
        return {k: (MASK if k in MASKED_FIELDS and v is not None else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


class Approvals:
    def __init__(self, rt, settings: ApprovalSettings | None = None) -> None:
        self.rt = rt
        self.db = rt.storage
        self.settings = settings or ApprovalSettings.from_config(rt.config)
        self.seal = rt.access_seal
        self._tasks: set[asyncio.Task] = set()

    # --------------------------------------------------------------- requests
    async def request(self, who: Requester, ks: KeyStore | None, op_name: str, params: dict) -> None:
        """Hold a change as a change request; always raises ApprovalRequired (or a refusal).

        `ks` None: operator management, decided by another global admin."""
        if who.operator is None:
            raise Forbidden("a change request needs an operator identity: use an operator token, a user access key "
                            "(v1.2) or a bearer token (v1.3)")
        op = who.operator
        if ks is None:
            needed, role, project_id, where = max(1, self.settings.operators_needed), "admin", None, \
                "operator management"
        else:
            needed, role, project_id, where = max(1, int(ks.approvals_needed)), "approver", ks.project_id, \
                f"key store {ks.name!r}"
        now = timeutil.now()
        lineage = await Lineage.load(self.db, self.rt.access_seal)
        eligible = len(lineage.eligible(op.id, role, project_id, timeutil.to_db(now)))
        if eligible < needed:
            # Fail closed: a request nobody can approve would wait forever, or tempt a bypass.
            raise ApprovalUnavailable(
                f"{where} requires {needed} approval(s) but only {eligible} enabled operator(s) with the {role} role "
                f"can approve your requests (not you, nor operators you created, granted a role or handed a "
                f"credential, nor those who did that for you, directly or through others); add {role}s "
                f"or lower approvalsNeeded")
        public = {k: v for k, v in params.items() if k not in SECRET_FIELDS or v is None}
        hidden = {k: v for k, v in params.items() if k in SECRET_FIELDS and v is not None}
        diff = await self._diff(ks, op_name, params)
        expires = now + dt.timedelta(days=self.settings.expiry_days)
        ks_id = ks.id if ks is not None else None
        await self.seal.key()          # before the transaction: loading it may seal rows in one of its own
        async with self.db.transaction() as tx:
            row = await tx.fetchone(
                "INSERT INTO change_requests (keystore_id, project_id, op, params, diff, status, approvals_needed, "
                "requested_by, requester_id, credential, created_at, updated_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, 'PENDING', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                ks_id, project_id, op_name, json.dumps(public), json.dumps(diff), needed, op.name, op.id,
                who.credential, timeutil.to_db(now), timeutil.to_db(now), timeutil.to_db(expires))
            rid = int(row["id"])
            await self.seal.seal_new(tx, "change_requests", rid)
            if hidden:
                blob = self.rt.barrier.seal(json.dumps(hidden).encode(), _aad(rid))
                await tx.execute("UPDATE change_requests SET secrets_sealed = ? WHERE id = ?", blob, rid)
        key_id = params.get("key_id")
        await self.rt.events.publish(Event(ks_id or 0, "approval_requested", key_id=key_id))
        await self._audit("approval.requested", op.name, "operator", ks_id, key_id, rid,
                          detail={"credential": who.credential} if who.credential else None, project_id=project_id)
        self._notify({"event": "approval_requested", "changeRequestId": rid, "keyStoreId": ks_id,
                      "keyStoreName": ks.name if ks is not None else None, "projectId": project_id,
                      "operation": op_name, "keyId": key_id, "requestedBy": op.name,
                      "approvalsNeeded": needed, "expirationDatetime": timeutil.to_api(expires), "diff": diff})
        raise ApprovalRequired(rid, f"{where} requires {needed} approval(s); change request {rid} waits for "
                                    f"{'another global admin' if ks is None else 'an approver'}")

    async def _diff(self, ks: KeyStore | None, op_name: str, params: dict) -> dict:
        """What will change, as {field, from, to} entries; secret values masked."""
        changes: list[dict] = []
        if ks is None:
            target = {"operator": params.get("name")}
            changes = [{"field": k, "from": None, "to": v} for k, v in params.items()
                       if k not in ("name", "requester_id") and v is not None]
            return {"operation": op_name, "target": target, "changes": mask(changes)}
        target: dict[str, Any] = {"keyStoreId": ks.id, "keyStoreName": ks.name}
        if op_name == "keystore.update":
            for k, v in (params.get("changes") or {}).items():
                if v is not None and getattr(ks, k, None) != v:
                    old = getattr(ks, k, None)
                    changes.append({"field": k, "from": getattr(old, "value", old), "to": v})
        elif "key_id" in params:
            key: Key = await self.rt.keys.key(params["key_id"])
            target.update(keyId=key.id, keyName=key.name, keyType=key.key_type.value)
            after = {"key.rotate": {"version": key.current_version + 1},
                     "update_secret": {"version": key.current_version + 1},
                     "key.schedule_deletion": {"status": "SCHEDULED_DELETION"},
                     "key.cancel_deletion": {"status": "ACTIVE"},
                     "key.delete": {"status": "DELETED"}}.get(op_name, {})
            before = {"version": key.current_version, "status": key.status.value}
            for k, v in after.items():
                changes.append({"field": k, "from": before[k], "to": v})
            for k, v in params.items():
                if k == "key_id" or v is None:
                    continue
                old = {"description": key.description, "auto_rotation_days": key.auto_rotation_days}.get(k)
                if k in MASKED_FIELDS or old != v:
                    changes.append({"field": k, "from": None if k in MASKED_FIELDS else old, "to": v})
        else:
            for k, v in params.items():
                if k != "keystore_id" and v is not None:
                    changes.append({"field": k, "from": None, "to": v})
        return {"operation": op_name, "target": target, "changes": mask(changes)}

    # -------------------------------------------------------------- decisions
    @staticmethod
    def _role(row: dict) -> str:
        """Operator management is decided by global admins; key-store changes by approvers."""
        return "admin" if row["keystore_id"] is None else "approver"

    async def _requester_id(self, tx, row: dict) -> int | None:
        if row["requester_id"] is not None:
            return int(row["requester_id"])
        # A request from before operator identities: `name`, `uak:ID@name` or `token:ID/uak:ID@name`.
        name = str(row["requested_by"]).rsplit("@", 1)[-1]
        found = await tx.fetchval("SELECT id FROM operators WHERE name = ?", name)
        return int(found) if found is not None else None

    def _check_scope(self, by: Operator, row: dict) -> None:
        if not by.sees(row["project_id"]) or (row["project_id"] is None and not by.is_global):
            raise NotFound(f"no change request {row['id']}")

    async def approve(self, by: Operator, request_id: int, comment: str = "") -> dict:
        text.check(comment, "comment")
        await self.expire_due()
        apply_now = False
        await self.seal.key()
        async with self.db.transaction() as tx:
            row = await self._lock_pending(tx, request_id, by)
            role = self._role(row)
            by.require(role, project_id=row["project_id"])
            if not await self.seal.valid("change_requests", row):
                # What would be applied, or what approvers were shown, is not what was asked.
                raise BarrierError(f"change request {request_id} was changed outside the key server, so it cannot "
                                   "be approved; deny it, and have the change requested again")
            requester_id = await self._requester_id(tx, row)
            lineage = await Lineage.load(tx, self.rt.access_seal)
            refusal = lineage.refusal(by.id, requester_id, role, row["project_id"], row["created_at"])
            if refusal is None and row["keystore_id"] is None:
                target = json.loads(row["params"]).get("name")
                if target is not None and target == by.name:
                    refusal = "a change to your own account is decided by another admin"
            if refusal is not None:
                raise Forbidden(refusal)
            counted = await self._approvals(tx, request_id)
            if any(a["operator"] == by.name or a["operator_id"] == by.id for a in counted):
                raise Conflict("you have already approved this change request; it needs another approver")
            # A row in this approver's name that fails its seal was written into the database: it neither
            # counts nor stands in the way of the real approval.
            await tx.execute("DELETE FROM change_approvals WHERE request_id = ? AND operator = ?", request_id, by.name)
            await self.seal.insert(tx, "change_approvals", {
                "request_id": request_id, "operator": by.name, "operator_id": by.id, "comment": comment[:1000],
                "created_at": timeutil.now_db()})
            if len(counted) + 1 >= int(row["approvals_needed"]):    # forged approvals are not in `counted`
                # Compare-and-set: only the transaction that moves PENDING -> APPROVED applies it.
                now = timeutil.now_db()
                apply_now = await self.seal.update(tx, "change_requests", "id = ? AND status = 'PENDING'",
                                                   (request_id,), {"status": "APPROVED", "decided_by": by.name,
                                                                   "decided_at": now, "updated_at": now}) == 1
        if apply_now:
            before = await self.get(request_id)
            await self._apply(request_id, by)
            try:
                return await self.get(request_id)
            except NotFound:
                # Applying deleted the request with its key store (keystore.delete): answer from the snapshot.
                return {**before, "status": "APPLIED", "decidedBy": by.name,
                        "decisionDatetime": timeutil.to_api(timeutil.now_db())}
        return await self.get(request_id)

    async def deny(self, by: Operator, request_id: int, reason: str = "") -> dict:
        text.check(reason, "comment")
        await self.expire_due()
        async with self.db.transaction() as tx:
            row = await self._lock_pending(tx, request_id, by)
            by.require(self._role(row), project_id=row["project_id"])
            if await self._requester_id(tx, row) == by.id:
                raise Forbidden("the requester cannot decide their own change request; cancel it instead")
            await self._finish(tx, request_id, "DENIED", by.name, reason[:1000] or "denied")
        await self._audit("approval.denied", by.name, "operator", row["keystore_id"], None, request_id,
                          project_id=row["project_id"])
        return await self.get(request_id)

    async def cancel(self, by: Operator, request_id: int) -> dict:
        await self.expire_due()
        async with self.db.transaction() as tx:
            row = await self._lock_pending(tx, request_id, by)
            if await self._requester_id(tx, row) != by.id:
                raise Forbidden("only the requester can cancel a change request")
            await self._finish(tx, request_id, "CANCELLED", by.name, "cancelled by the requester")
        return await self.get(request_id)

    async def _lock_pending(self, tx, request_id: int, by: Operator) -> dict:
        # Touch the row first: on PostgreSQL this takes its lock, so decisions on one request serialise.
        await tx.execute("UPDATE change_requests SET updated_at = ? WHERE id = ?", timeutil.now_db(), request_id)
        row = await tx.fetchone("SELECT * FROM change_requests WHERE id = ?", request_id)
        if row is None:
            raise NotFound(f"no change request {request_id}")
        self._check_scope(by, row)          # another project's request: as if it did not exist
        if row["status"] != "PENDING":
            raise Conflict(f"change request {request_id} is {row['status']}, not PENDING")
        if row["expires_at"] <= timeutil.now_db():
            raise Conflict(f"change request {request_id} has expired")
        return row

    async def _finish(self, tx, request_id: int, status: str, by: str | None, reason: str,
                      result: dict | None = None) -> None:
        """A final status: only ever narrows (nothing is applied after it), so an edited row keeps failing."""
        now = timeutil.now_db()
        await self.seal.update(tx, "change_requests", "id = ?", (request_id,), {
            "status": status, **({"decided_by": by} if by is not None else {}), "decided_at": now,
            "updated_at": now, "reason": reason, "result": json.dumps(result) if result is not None else None,
            "secrets_sealed": None}, check=False)

    async def _approvals(self, db, request_id: int) -> list[dict]:
        """The approvals of a request that pass their seal, oldest first."""
        rows = await db.fetchall("SELECT * FROM change_approvals WHERE request_id = ? ORDER BY created_at",
                                 request_id)
        return [r for r in rows if await self.seal.valid("change_approvals", r)]

    async def _apply(self, request_id: int, by: Operator) -> None:
        row = await self.db.fetchone("SELECT * FROM change_requests WHERE id = ?", request_id)
        params = json.loads(row["params"])
        status, reason, result, collect = "APPLIED", "", None, None
        try:
            if not await self.seal.valid("change_requests", row):
                # Edited between its approval and now: apply nothing.
                raise BarrierError("the change request was changed outside the key server after it was approved; "
                                   "nothing was applied")
            if row["secrets_sealed"] is not None:
                params.update(json.loads(self.rt.barrier.open(bytes(row["secrets_sealed"]), _aad(request_id))))
            out = await self.rt.changes.apply(row["op"], params, row["requested_by"])
            result = _summary(out)
            if isinstance(out, dict) and out.get("_collect"):
                # A credential made for someone else (an operator token): sealed for the requester to
                # collect once (`POST /approvals/{id}/collect`), never in the result.
                collect = self.rt.barrier.seal(json.dumps(out["_collect"]).encode(), _aad(request_id))
        except SKMError as e:
            status, reason = "FAILED", e.message + (f": {e.detail}" if e.detail else "")
        except Exception:
            log.exception("change_request_apply_failed", change_request=request_id, op=row["op"])
            status, reason = "FAILED", "internal error while applying; see the server log"
        finally:
            params.clear()
        async with self.db.transaction() as tx:
            await self._finish(tx, request_id, status, None, reason, result)
            if status == "APPLIED" and collect is not None:
                await tx.execute("UPDATE change_requests SET secrets_sealed = ? WHERE id = ?", collect, request_id)
        await self._audit(f"approval.{status.lower()}", by.name, "operator", row["keystore_id"],
                          (result or {}).get("keyId") or json.loads(row["params"]).get("key_id"), request_id,
                          result="ok" if status == "APPLIED" else "error", reason=reason or None,
                          project_id=row["project_id"])

    async def collect(self, by: Operator, request_id: int) -> dict:
        """The requester takes, once, a credential an applied request made for someone else."""
        async with self.db.transaction() as tx:
            row = await tx.fetchone("SELECT * FROM change_requests WHERE id = ?", request_id)
            if row is None:
                raise NotFound(f"no change request {request_id}")
            self._check_scope(by, row)
            if await self._requester_id(tx, row) != by.id or not await self.seal.valid("change_requests", row):
                raise Forbidden("only the requester collects what their change request made")
            if row["status"] != "APPLIED" or row["secrets_sealed"] is None:
                raise Conflict(f"change request {request_id} has nothing to collect (status {row['status']}; "
                               "a credential is collected once)")
            out = json.loads(self.rt.barrier.open(bytes(row["secrets_sealed"]), _aad(request_id)))
            await tx.execute("UPDATE change_requests SET secrets_sealed = NULL, updated_at = ? WHERE id = ?",
                             timeutil.now_db(), request_id)
        return out

    async def expire_due(self, now: dt.datetime | None = None) -> int:
        stamp = timeutil.to_db(now or timeutil.now())
        n = await self.seal.update(self.db, "change_requests", "status = 'PENDING' AND expires_at <= ?", (stamp,), {
            "status": "EXPIRED", "decided_at": stamp, "updated_at": stamp,
            "reason": "no decision before the request expired", "secrets_sealed": None}, check=False)
        if n:
            await self._audit("approval.expired", "SECURE_KEY_MANAGER", "system", None, None, None,
                              detail={"count": n})
        return n

    # ---------------------------------------------------------------- reading
    async def get(self, request_id: int, by: Operator | None = None) -> dict:
        row = await self.db.fetchone("SELECT * FROM change_requests WHERE id = ?", request_id)
        if row is None:
            raise NotFound(f"no change request {request_id}")
        if by is not None:
            self._check_scope(by, row)
        return await self._api(row)

    async def list(self, *, status: str | None = None, keystore_id: int | None = None,
                   requested_by: str | None = None, limit: int = 100,
                   project_ids: frozenset[int] | None = None) -> list[dict]:
        """`project_ids`: only requests of these projects (a project-scoped operator); None: all."""
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
        await self.expire_due()
        where, args = [], []
        for col, val in (("status", status), ("keystore_id", keystore_id), ("requested_by", requested_by)):
            if val is not None:
                where.append(f"{col} = ?"), args.append(val)
        if project_ids is not None:
            ids = sorted(int(p) for p in project_ids)
            where.append(f"project_id IN ({', '.join('?' * len(ids))})" if ids else "1 = 0")
            args.extend(ids)
        sql = "SELECT * FROM change_requests" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = await self.db.fetchall(sql + " ORDER BY id DESC LIMIT ?", *args, limit)
        return [await self._api(r) for r in rows]

    async def _api(self, row: dict) -> dict:
        """A request as shown: INVALID when its row fails its seal; only approvals that pass theirs."""
        out = _api(row, await self._approvals(self.db, int(row["id"])))
        if not await self.seal.valid("change_requests", row):
            out["status"] = "INVALID"
        return out

    # ---------------------------------------------------------- notification
    async def _audit(self, action: str, actor: str, kind: str, ks_id: int | None, key_id: str | None,
                     rid: int | None, *, result: str = "ok", reason: str | None = None,
                     detail: dict | None = None, project_id: int | None = None) -> None:
        if self.rt.audit is None:
            return
        d = {"changeRequestId": rid} if rid is not None else {}
        extra = {"project_id": project_id} if _takes(self.rt.audit.event, "project_id") else {}
        await self.rt.audit.event(action, actor=actor, actor_kind=kind, keystore_id=ks_id, key_id=key_id,
                                  result=result, reason=reason, detail={**d, **(detail or {})}, **extra)

    def _notify(self, payload: dict) -> None:
        if not self.settings.webhook_url:
            return
        task = asyncio.get_running_loop().create_task(self._post(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, payload: dict) -> bool:
        s = self.settings
        ctx: ssl.SSLContext | bool | None = None
        if s.webhook_ca:
            ctx = ssl.create_default_context(cafile=s.webhook_ca)
        delay = 0.5
        for attempt in range(1, max(1, s.webhook_retries) + 1):
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.webhook_timeout)) as http:
                    async with http.post(s.webhook_url, json=payload, ssl=ctx) as r:
                        if r.status < 300:
                            return True
                        log.warning("approval_webhook_refused", status=r.status, attempt=attempt)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                log.warning("approval_webhook_failed", error=type(e).__name__, attempt=attempt)
            if attempt < s.webhook_retries:
                await asyncio.sleep(delay)
                delay *= 2
        return False

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except BaseException:
                pass


def _takes(fn: Any, param: str) -> bool:
    """Whether the audit log of this build records `param` (the audit package adds project_id)."""
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _summary(out: Any) -> dict:
    """Identifiers of what an applied change produced (never values)."""
    if isinstance(out, Key):
        return {"keyId": out.id, "keyVersion": out.current_version, "keyStatus": out.status.value}
    if isinstance(out, KeyStore):
        return {"keyStoreId": out.id}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if k in ("keyId", "keyStoreId", "name", "value", "status",
                                                      "deletionDateTime", "fingerprint", "operator", "role",
                                                      "projectId", "tokenId", "accessKeyId") and
                isinstance(v, (str, int, type(None)))}
    if isinstance(out, str):
        return {"deletionDateTime": out}
    return {}


def _api(r: dict, approvals: list[dict]) -> dict:
    return {"changeRequestId": int(r["id"]),
            "keyStoreId": int(r["keystore_id"]) if r["keystore_id"] is not None else None,
            "projectId": r["project_id"], "credential": r["credential"], "operation": r["op"],
            "status": r["status"], "requestedBy": r["requested_by"], "approvalsNeeded": int(r["approvals_needed"]),
            "approvals": [{"operator": a["operator"], "comment": a["comment"],
                           "datetime": timeutil.to_api(a["created_at"])} for a in approvals],
            "diff": json.loads(r["diff"]), "reason": r["reason"] or None,
            "result": json.loads(r["result"]) if r["result"] else None, "decidedBy": r["decided_by"],
            "creationDatetime": timeutil.to_api(r["created_at"]),
            "expirationDatetime": timeutil.to_api(r["expires_at"]),
            "decisionDatetime": timeutil.to_api(r["decided_at"])}


def install(rt) -> None:
    from server.access import operator_changes  # noqa: F401  (registers the operator.* changes)
    rt.approvals = Approvals(rt, ApprovalSettings.from_config(rt.config))
    if rt.changes is not None:
        rt.changes.approvals = rt.approvals
        rt.changes.operators = rt.operators
        rt.changes.callers = rt.callers
    tasks: list[asyncio.Task] = []

    async def expire_loop(rt_) -> None:
        while True:
            await asyncio.sleep(rt_.approvals.settings.expire_interval)
            if rt_.barrier.sealed:
                continue
            try:
                await rt_.approvals.expire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("approval_expiry_failed")

    async def start(rt_) -> None:
        tasks.append(asyncio.create_task(expire_loop(rt_), name="approval-expiry"))

    async def stop(rt_) -> None:
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:
                pass
        tasks.clear()
        await rt_.approvals.close()

    rt.extra.setdefault("on_start", []).append(start)
    rt.extra.setdefault("on_stop", []).append(stop)
