"""Operator lineage: who made whom, who granted what, who held whose credentials.

Separation of duties rests on it. An approval counts only from an operator who
* is not the requester;
* held a role that may decide the request (approver of the request's project or
  global approver; global admin for operator management) granted BEFORE the
  request was made, and still holds it;
* does not descend from the requester: the requester is not among the
  approver's ancestors, following every edge that could put an operator in
  someone's hands, transitively: who created it, who granted it any role (ever,
  revoked or not), who reset its password or issued it a token or an access key
  (`operator_custody`). An operator made by someone the requester made counts as
  the requester's too.

The graph is small (operators of one installation), so it is loaded whole and
walked in memory; a decision reads it inside the decision's transaction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.storage.base import Executor


@dataclass(frozen=True)
class GrantRow:
    operator_id: int
    role: str
    project_id: int | None
    granted_by_id: int | None
    granted_at: str
    revoked_at: str | None


SELF = "the requester cannot approve their own change request"
LATE = ("your {role} role was granted after this change request was made; only {role}s who held the role "
        "before the request count")
NO_ROLE = "this needs the {role} role for the change request's project"
DESCENDS = ("you were created, given a role or handed a credential by the requester (directly or through "
            "operators the requester made); your approval does not count for their change request")


@dataclass
class Lineage:
    parents: dict[int, set[int]] = field(default_factory=dict)
    grants: dict[int, list[GrantRow]] = field(default_factory=dict)
    usable: set[int] = field(default_factory=set)          # enabled, not deleted

    @classmethod
    async def load(cls, db: Executor) -> "Lineage":
        g = cls()
        for r in await db.fetchall("SELECT id, created_by_id, disabled, deleted_at FROM operators"):
            g.parents.setdefault(r["id"], set())
            if r["created_by_id"] is not None:
                g.parents[r["id"]].add(int(r["created_by_id"]))
            if not r["disabled"] and r["deleted_at"] is None:
                g.usable.add(r["id"])
        for r in await db.fetchall("SELECT operator_id, role, project_id, granted_by_id, granted_at, revoked_at "
                                   "FROM operator_roles"):
            row = GrantRow(r["operator_id"], r["role"], r["project_id"], r["granted_by_id"], r["granted_at"],
                           r["revoked_at"])
            g.grants.setdefault(row.operator_id, []).append(row)
            if row.granted_by_id is not None:
                g.parents.setdefault(row.operator_id, set()).add(int(row.granted_by_id))
        for r in await db.fetchall("SELECT operator_id, by_id FROM operator_custody"):
            g.parents.setdefault(r["operator_id"], set()).add(int(r["by_id"]))
        return g

    def ancestors(self, op_id: int) -> set[int]:
        seen: set[int] = set()
        todo = list(self.parents.get(op_id, ()))
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            todo.extend(self.parents.get(p, ()))
        seen.discard(op_id)
        return seen

    def active_grants(self, op_id: int, role: str, project_id: int | None) -> list[GrantRow]:
        """Current grants of `role` that cover `project_id` (None: only a global grant covers it)."""
        return [g for g in self.grants.get(op_id, ()) if g.revoked_at is None and g.role == role
                and (g.project_id is None or (project_id is not None and g.project_id == project_id))]

    def refusal(self, approver_id: int, requester_id: int | None, role: str, project_id: int | None,
                requested_at: str) -> str | None:
        """Why `approver_id` may not decide this request, or None when the decision counts."""
        if requester_id is not None and approver_id == requester_id:
            return SELF
        held = self.active_grants(approver_id, role, project_id)
        if not held:
            return NO_ROLE.format(role=role)
        if not any(g.granted_at < requested_at for g in held):
            return LATE.format(role=role)
        if requester_id is None or requester_id in self.ancestors(approver_id):
            # An unknown requester (a legacy request nobody can be traced to) fails closed too.
            return DESCENDS
        return None

    def eligible(self, requester_id: int | None, role: str, project_id: int | None, requested_at: str) -> list[int]:
        return [op for op in sorted(self.usable)
                if self.refusal(op, requester_id, role, project_id, requested_at) is None]
