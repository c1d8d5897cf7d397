"""Verifying the audit chain: digests, keyed tags and signed checkpoints (docs/audit.md).

One walker serves the live check (database, audit key, checkpoints from the sinks) and the offline
check of an export (records and checkpoints from the file, the checkpoint public key): it names the
first bad record and why.

A result is `intact`, `broken` (a bad record, or evidence removed: the checkpoint log of a chain that
has served is missing or empty) or `unverified` (not intact, nothing proven wrong: the tags or the
checkpoints could not be checked; `reason` says what to do). Only `intact` is `ok`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from server.audit.record import GENESIS, expected_digest, tag_ok


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    broken_seq: int | None = None
    reason: str | None = None
    keyed: bool = False              # tags were checked (the audit key was at hand)
    untagged: int = 0                # records written while the barrier was sealed (no tag possible)
    checkpoints: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    unverified: bool = False         # not ok because something could not be checked (not proven broken)

    @property
    def status(self) -> str:
        return "intact" if self.ok else ("unverified" if self.unverified else "broken")

    def cannot_check(self, reason: str) -> None:
        """An intact-looking chain that may not be called intact (a broken one stays broken)."""
        if self.ok:
            self.ok, self.unverified, self.reason = False, True, reason

    def to_api(self) -> dict:
        return {"ok": self.ok, "status": self.status, "checked": self.checked, "headSeq": self.head_seq,
                "brokenSeq": self.broken_seq, "reason": self.reason, "keyed": self.keyed, "untagged": self.untagged,
                "checkpoints": self.checkpoints, "warnings": self.warnings}


class Broken(Exception):
    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.reason = seq, reason


class Walker:
    """Feed records in seq order; raises Broken at the first bad one."""

    def __init__(self, *, keyed_from: int | None, key: bytes | None = None,
                 checkpoints: list[dict] | None = None, first_seq: int | None = 1) -> None:
        self.keyed_from = keyed_from
        self.key = key
        self.expected = first_seq          # None: an export that starts anywhere
        self.prev: str | None = GENESIS if first_seq == 1 else None
        self.n = 0
        self.untagged = 0
        self.untagged_seqs: list[int] = []      # the first few, to name in the warning
        self.last_seq = 0 if first_seq is None else first_seq - 1
        self.cps: dict[int, list[dict]] = {}
        for c in checkpoints or []:
            self.cps.setdefault(int(c["checkpoint"]["seq"]), []).append(c["checkpoint"])

    def _legacy(self, r: dict) -> bool:
        if self.keyed_from is None:
            return r.get("tag") is None
        return int(r["seq"]) < self.keyed_from

    def feed(self, r: dict) -> None:
        seq = int(r["seq"])
        if self.expected is None:
            self.expected = seq
        if seq != self.expected:
            raise Broken(self.expected, f"record {self.expected} is missing (deleted); the chain jumps to {seq}")
        if self.prev is not None and r["prev_hash"] != self.prev:
            raise Broken(seq, f"record {seq} does not chain to record {seq - 1} (a record was replaced)")
        legacy = self._legacy(r)
        if legacy and r.get("tag") is not None:
            raise Broken(seq, f"record {seq} carries a tag before keyed links began (record {self.keyed_from})")
        if expected_digest(r, legacy) != r["hash"]:
            raise Broken(seq, f"record {seq} was changed: its contents do not match its digest")
        if not legacy:
            if r.get("tag") is None:
                # The writer never writes one (records made while sealed wait in memory for the key):
                # a keyed record without a tag was rewritten by someone without the audit key.
                raise Broken(seq, f"record {seq} has no tag although keyed links began at record "
                             f"{self.keyed_from}: it was rewritten without the audit key")
            if self.key is not None and not tag_ok(self.key, r["hash"], r["tag"]):
                raise Broken(seq, f"record {seq} was rewritten: its tag does not match (the chain was recomputed "
                             "without the audit key)")
        for c in self.cps.get(seq, ()):
            if c["digest"] != r["hash"]:
                raise Broken(seq, f"record {seq} differs from the checkpoint signed at {c['at']} (a record at or "
                             "before it was changed, or the log was rebuilt)")
        self.prev, self.expected, self.n, self.last_seq = r["hash"], seq + 1, self.n + 1, seq

    def finish(self, head_seq: int | None = None, head_digest: str | None = None) -> None:
        if head_seq is not None:
            if self.last_seq < head_seq:
                raise Broken(self.last_seq + 1, f"record {self.last_seq + 1} is missing (deleted); the log ends "
                             f"before the head ({head_seq})")
            if head_seq and self.prev != head_digest:
                raise Broken(head_seq, f"the last record ({head_seq}) does not match the head")
        beyond = [c for s, cs in self.cps.items() if s > self.last_seq for c in cs]
        if beyond:
            c = max(beyond, key=lambda c: c["seq"])
            raise Broken(self.last_seq + 1, f"the log ends at record {self.last_seq}, but a checkpoint signed at "
                         f"{c['at']} covers record {c['seq']}: records were removed from the end, or the database "
                         "was replaced by an older copy")
        for cs in self.cps.values():
            for c in cs:
                kf = c.get("keyedFrom")
                if self.keyed_from is not None and kf is not None and int(kf) != self.keyed_from:
                    raise Broken(min(int(kf), self.keyed_from), f"keyed links begin at record {self.keyed_from} "
                                 f"here but at {kf} in the checkpoint signed at {c['at']} (the log was "
                                 "downgraded to unkeyed links)")


def checkpoint_summary(cps: list[dict], head_seq: int, sources: list[str]) -> dict:
    latest = max(cps, key=lambda c: (c["checkpoint"]["seq"], c["checkpoint"]["at"]))["checkpoint"] if cps else None
    return {"checked": len(cps), "sources": sources,
            "latestSeq": latest["seq"] if latest else None, "latestAt": latest["at"] if latest else None,
            "uncovered": max(0, head_seq - (latest["seq"] if latest else 0))}


async def verify_chain(db, *, key: bytes | None = None, checkpoints: list[dict] | None = None,
                       epoch: str | None = None, sources: list[str] | None = None,
                       unreadable: list[str] | None = None, foreign: list[str] | None = None,
                       page: int = 1000) -> VerifyResult:
    """Walk the chain from the first record to the head; report the first broken link.

    Without `key` only digests are checked (anyone holding the database can recompute those);
    with it every tag; with `checkpoints` (already signature-checked) every signed head of the
    current `epoch`, and a log that ends before one of them is reported as truncated. With
    `checkpoints` given, a chain with records and no checkpoint of its epoch is not intact (see
    `_no_checkpoint`); `unreadable` names the sinks that could not be read (`name: why`); `foreign`
    summarises checkpoints the sinks hold under another key (the database's key was replaced)."""
    head = await db.fetchone("SELECT * FROM audit_head WHERE id = 1")
    if head is None:
        return VerifyResult(False, 0, 0, 0, "the audit head row is missing")
    head_seq = int(head["seq"])
    keyed_from = head.get("keyed_from") if hasattr(head, "get") else head["keyed_from"]
    keyed_from = None if keyed_from is None else int(keyed_from)
    mine = [c for c in (checkpoints or []) if c["checkpoint"]["epoch"] == epoch] if checkpoints is not None else []
    w = Walker(keyed_from=keyed_from, key=key, checkpoints=mine)
    res = VerifyResult(True, 0, head_seq, keyed=key is not None)
    try:
        expected = 1
        while expected <= head_seq:
            rows = await db.fetchall("SELECT * FROM audit_log WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
                                     expected, head_seq, page)
            if not rows:
                break
            for r in rows:
                w.feed(dict(r))
            expected = w.expected
        w.finish(head_seq, head["hash"])
    except Broken as b:
        res.ok, res.broken_seq, res.reason = False, b.seq, b.reason
    res.checked, res.untagged = w.n, w.untagged
    if checkpoints is not None:
        res.checkpoints = checkpoint_summary(mine, head_seq, sources or [])
        if unreadable:
            res.checkpoints["unreadable"] = list(unreadable)
        if (not mine and head_seq) or (mine and head["restore_note"] is not None):
            _no_checkpoint(res, head, sources or [], unreadable or [])
        elif mine and not any(c["checkpoint"]["kind"] in ("start", "restore") for c in mine):
            # Every epoch's log begins with a stored start (or restore) checkpoint (the server retries it
            # until a sink takes it): without one, the log was emptied and has refilled since.
            why = ("the checkpoint log holds no start checkpoint of this chain (every server start signs one): "
                   "it was emptied or rewritten, so the log's end cannot be vouched for")
            if unreadable:
                res.cannot_check(why + f"; but {'; '.join(unreadable)}: verify again once it is reachable")
            elif res.ok:
                res.ok, res.reason = False, why
        elif unreadable:
            res.warnings.append(f"checkpoints checked against {', '.join(sources or [])} only; could not read "
                                + "; ".join(unreadable))
        if foreign:
            res.checkpoints["otherKeys"] = list(foreign)
            why = ("the checkpoint log holds checkpoints signed by another checkpoint key (" + "; ".join(foreign)
                   + "): the database's checkpoint key was replaced, which lets whoever holds the database cut or "
                   "rewrite the chain and sign it anew; restore the database from a backup (a checkpoint log "
                   "must not be shared by two installations)")
            if res.ok or res.unverified:
                res.ok, res.unverified, res.reason = False, False, why
            else:
                res.warnings.append(why)
    return res


def _no_checkpoint(res: VerifyResult, head, sources: list[str], unreadable: list[str]) -> None:
    """A chain with records and no signed checkpoint of its epoch. Every server start signs one, so:

    * restored from a backup, not started since: the new epoch's `restore` checkpoint comes at the
      next start (unverified);
    * no checkpoint key yet (never signed: a store whose server has not started since it was made or
      upgraded): unverified;
    * a sink could not be read (the system-key server down): unverified, never intact;
    * otherwise the sinks answered and hold nothing of this chain: the checkpoint log is missing or
      was emptied (broken)."""
    n = res.head_seq
    if head["restore_note"] is not None:
        res.cannot_check(f"the chain was restored from a backup (a new epoch) and its restore checkpoint is signed "
                         f"at the server's next start: start the server, then verify again ({n} record(s) not "
                         "yet pinned)")
    elif head["checkpoint_key_sealed"] is None:
        res.cannot_check(f"no checkpoint has been signed for this chain yet ({n} record(s)); the server signs one "
                         "when it starts: start it (or wait for its start checkpoint), then verify again")
    elif unreadable:
        res.cannot_check(f"no checkpoint could be read: {'; '.join(unreadable)}. Truncation cannot be ruled out "
                         "until the checkpoint store answers: verify again once it is reachable")
    elif not sources:
        res.cannot_check("no checkpoint store can be read back (a webhook is write-only): configure the system-key "
                         "server or [audit] checkpoint_file, or verify an export offline")
    elif res.ok:
        res.ok = False
        res.reason = (f"no signed checkpoint of this chain was found in {', '.join(sources)} although it holds {n} "
                      "record(s): the checkpoint log is missing or was emptied (every server start signs one), so "
                      "the log's end cannot be vouched for; records may have been removed from the end")


def walk_export(records: Iterable[dict], checkpoints: list[dict], *, keyed_from: int | None) -> VerifyResult:
    """Offline: digests of an export and the signed checkpoints that fall inside it."""
    w = Walker(keyed_from=keyed_from, checkpoints=checkpoints, first_seq=None)
    res = VerifyResult(True, 0, 0)
    try:
        for r in records:
            w.feed(r)
        res.head_seq = w.last_seq
        w.finish()
    except Broken as b:
        res.ok, res.broken_seq, res.reason = False, b.seq, b.reason
    res.checked, res.untagged, res.head_seq = w.n, w.untagged, w.last_seq
    res.checkpoints = checkpoint_summary(checkpoints, w.last_seq, ["export"])
    first = w.last_seq - w.n + 1
    covered = [c for c in checkpoints if first <= c["checkpoint"]["seq"] <= w.last_seq]
    if not covered and res.ok and w.n:
        res.ok = False
        res.reason = ("no checkpoint signed by this key falls inside the export, so nothing pins its records (the "
                      "checkpoints were removed, the key is not this installation's, or the export was written "
                      "from the database without them): export from the server with `skm audit export`")
    return res
