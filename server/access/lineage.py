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
  the requester's too;
* is not an ancestor of the requester (the same edges, the other way): an admin
  who made a puppet, requests as the puppet and approves as itself is one person;
* was not reached, after the request was made, by someone behind the requester:
  an edge into the approver's ancestry (created, granted a role, handed a
  credential) made within the request's lifetime by the requester's ancestor
  puts the approver in that person's hands while the request waits.

A common ancestor through edges older than the request does not count against an
approval: the first admin is everyone's ancestor, so refusing every common ancestor
would leave no approver at all. Against a lone admin who prepares both a requester
and an approver in advance, `[approvals] operators = true` is the control: making
operators, granting roles and handing credentials then need another admin.

The graph is small (operators of one installation), so it is loaded whole and
walked in memory; a decision reads it inside the decision's transaction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.access.seal import columns
from server.storage.base import Executor

if TYPE_CHECKING:
    from server.access.seal import AccessSeal


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
ANCESTOR = ("you created the requester, gave it a role or handed it a credential (directly or through "
            "operators you made); your approval does not count for its change request")
LATE_EDGE = ("since this change request was made, an operator behind the requester (one who created it, gave it "
             "a role or handed it a credential) created you, gave you a role or handed you a credential; your "
             "approval does not count for this request")
DESCENDS = ("you were created, given a role or handed a credential by the requester (directly or through "
            "operators the requester made); your approval does not count for their change request")


@dataclass(frozen=True)
class Edge:
    parent: int
    at: str                 # when the edge was made (the database's fixed-width UTC text)


@dataclass
class Lineage:
    parents: dict[int, set[int]] = field(default_factory=dict)
    edges: dict[int, list[Edge]] = field(default_factory=dict)     # child -> its edges, with times
    grants: dict[int, list[GrantRow]] = field(default_factory=dict)
    usable: set[int] = field(default_factory=set)          # enabled, not deleted

    @classmethod
    async def load(cls, db: Executor, seal: "AccessSeal | None" = None) -> "Lineage":
        """`seal`: an operator or grant row that fails its seal is neither usable nor held (its edges
        stay: an edge only ever refuses)."""
        g = cls()
        if seal is not None:
            await seal.key()    # loaded before the read (Operators._seal_ready); the caller authenticated with it
        for r in await db.fetchall(f"SELECT {columns('operators')} FROM operators"):
            g.parents.setdefault(r["id"], set())
            if r["created_by_id"] is not None:
                g._edge(r["id"], int(r["created_by_id"]), r["created_at"])
            if not r["disabled"] and r["deleted_at"] is None and (seal is None or await seal.valid("operators", r)):
                g.usable.add(r["id"])
        for r in await db.fetchall(f"SELECT {columns('operator_roles')} FROM operator_roles"):
            row = GrantRow(r["operator_id"], r["role"], r["project_id"], r["granted_by_id"], r["granted_at"],
                           r["revoked_at"])
            if row.granted_by_id is not None:
                g._edge(row.operator_id, int(row.granted_by_id), row.granted_at)
            if seal is None or await seal.valid("operator_roles", r):
                g.grants.setdefault(row.operator_id, []).append(row)
        for r in await db.fetchall("SELECT operator_id, by_id, at FROM operator_custody"):
            g._edge(int(r["operator_id"]), int(r["by_id"]), r["at"])
        return g

    def _edge(self, child: int, parent: int, at: str) -> None:
        self.parents.setdefault(child, set()).add(parent)
        self.edges.setdefault(child, []).append(Edge(parent, at))

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

    def late_reach(self, op_id: int, since: str) -> set[int]:
        """Who reached `op_id` through an edge made at or after `since`: the parent of such an edge into
        `op_id` or any of its ancestors, and that parent's own ancestors."""
        out: set[int] = set()
        for a in self.ancestors(op_id) | {op_id}:
            for e in self.edges.get(a, ()):
                if e.at >= since and e.parent not in out:
                    out.add(e.parent)
                    out |= self.ancestors(e.parent)
        return out

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
        behind = self.ancestors(requester_id)
        if approver_id in behind:
            return ANCESTOR
        if self.late_reach(approver_id, requested_at) & behind:
            return LATE_EDGE
        return None

    def eligible(self, requester_id: int | None, role: str, project_id: int | None, requested_at: str) -> list[int]:
        return [op for op in sorted(self.usable)
                if self.refusal(op, requester_id, role, project_id, requested_at) is None]
