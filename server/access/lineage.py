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

Against whoever can write the database: every edge into an operator is also kept in that
operator's own sealed row (`operators.lineage`: each parent's id and its latest edge's time;
the creator is already a sealed column), so deleting a grant or a custody row does not
remove the edge. An operator whose row fails its seal, or that an edge names but that is
gone (operators are never deleted), makes the lineage through it unknown: no approval
whose requester or approver descends from it counts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server import logs
from server.access.seal import columns
from server.errors import BarrierError, Conflict
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
UNKNOWN = ("operator {op} in the lineage of the requester or of the approver was changed or removed outside the key "
           "server, so who stands behind whom cannot be checked; no approval counts until it is restored from a "
           "backup (docs/disaster-recovery.md)")

log = logs.get("skm.access.lineage")


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
    unknown: set[int] = field(default_factory=set)         # rows failing their seal, or named by an edge but gone

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
            intact = seal is None or await seal.valid("operators", r)
            if not intact:
                g.unknown.add(r["id"])
            for parent, at in sealed_edges(r).items():
                g._edge(r["id"], parent, at)
            if not r["disabled"] and r["deleted_at"] is None and intact:
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
        g.unknown |= {p for ps in g.parents.values() for p in ps if p not in g.parents}
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
        above = self.ancestors(approver_id)
        if requester_id is None or requester_id in above:
            # An unknown requester (a legacy request nobody can be traced to) fails closed too.
            return DESCENDS
        behind = self.ancestors(requester_id)
        lost = (above | behind | {approver_id, requester_id}) & self.unknown
        if lost:
            return UNKNOWN.format(op=min(lost))
        if approver_id in behind:
            return ANCESTOR
        if self.late_reach(approver_id, requested_at) & behind:
            return LATE_EDGE
        return None

    def eligible(self, requester_id: int | None, role: str, project_id: int | None, requested_at: str) -> list[int]:
        return [op for op in sorted(self.usable)
                if self.refusal(op, requester_id, role, project_id, requested_at) is None]


# ---------------------------------------------------------------- edges sealed in the operator's row
def sealed_edges(row: dict) -> dict[int, str]:
    """`operators.lineage` of `row`: parent id -> time of its latest edge into this operator."""
    text = row.get("lineage")
    if not text:
        return {}
    try:
        return {int(k): str(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError):
        return {}      # not what the key server writes: the row then fails its seal as well


def _lineage_text(edges: dict[int, str]) -> str:
    return json.dumps({str(k): edges[k] for k in sorted(edges)}, separators=(",", ":"))


async def seal_edge(db: Executor, seal: "AccessSeal | None", child_id: int, parent_id: int | None, at: str) -> None:
    """Keep the edge `parent_id` -> `child_id` (made at `at`) in the child's sealed row, in the caller's
    transaction. A child whose row fails its seal is refused (BarrierError): the change it came with rolls
    back rather than sealing an edited row afresh."""
    if seal is None or parent_id is None or parent_id == child_id:
        return
    for _ in range(5):      # compare-and-set on the row's seal: a concurrent change of the row means read again
        row = await db.fetchone(f"SELECT {columns('operators')} FROM operators WHERE id = ?", child_id)
        if row is None:
            return
        edges = sealed_edges(row)
        if row["created_by_id"] == parent_id or edges.get(parent_id, "") >= at:
            return          # the creator is a sealed column already; a later edge from the same parent covers it
        edges[parent_id] = at
        if await seal.update(db, "operators", "id = ?", (child_id,), {"lineage": _lineage_text(edges)}):
            return
    raise Conflict("the operator changed while this change was being made; try again")


async def seal_lineage(db: Executor, seal: "AccessSeal") -> int:
    """Copy into each operator's sealed row the edges the grant and custody tables hold but the row does not
    (the first start after migration 13; afterwards only what a crash between the two writes left). Edges are
    only ever added. A row that fails its seal is left as it is. Returns the rows sealed again."""
    await seal.key()
    graph = await Lineage.load(db)          # every edge the tables hold (no seal checks: nothing here widens)
    resealed = 0
    for r in await db.fetchall(f"SELECT {columns('operators')} FROM operators"):
        have = sealed_edges(r)
        want = {**have}
        for e in graph.edges.get(r["id"], ()):
            if e.parent not in (r["id"], r["created_by_id"]) and want.get(e.parent, "") < e.at:
                want[e.parent] = e.at
        if want == have:
            continue
        try:
            resealed += await seal.update(db, "operators", "id = ? AND seal = ?", (r["id"], r["seal"]),
                                          {"lineage": _lineage_text(want)})
        except BarrierError:
            log.error("operator_lineage_not_sealed", operator_id=r["id"])   # an edited row stays as it is
    if resealed:
        log.info("operator_lineage_sealed", operators=resealed)
    return resealed
