"""The audit record: its fields, canonical form and links (docs/audit.md).

Each record has two link values:

* `hash`, the *digest*: SHA-256 over the record's canonical form, which includes the previous
  record's digest (`prev_hash`). Anyone can recompute it; it chains the records so that a signed
  checkpoint of one digest pins every record before it, which is what lets an export be verified
  offline with only the checkpoint public key.
* `tag`: HMAC-SHA256 of the digest under the link key (derived from the audit key, which is sealed
  under the system key). Recomputing a digest chain after an edit is easy; recomputing the tags
  needs the system key. Records written before keyed links existed have no tag (`legacy`) and use
  the old field list; they may only form a prefix of the chain.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server import timeutil
from server.jsontext import encoder
from server.text import storable

GENESIS = "0" * 64
TAG_PREFIX = "k1:"
# Fields of a legacy (untagged) record's digest, in this order.
LEGACY_FIELDS = ("seq", "at", "plane", "actor", "actor_kind", "ip", "fingerprint", "mac", "method", "route",
                 "action", "keystore_id", "key_id", "status", "result", "reason", "detail", "prev_hash")
# Fields of a keyed record's digest, in this order; also the stored columns (with hash and tag).
FIELDS = ("seq", "at", "plane", "actor", "actor_kind", "ip", "fingerprint", "mac", "method", "route", "action",
          "project_id", "keystore_id", "key_id", "change", "status", "result", "reason", "detail", "prev_hash")
INT_FIELDS = frozenset({"seq", "project_id", "keystore_id", "change", "status"})   # the rest are text


_encode = encoder(ensure_ascii=False)


def _canon(rec: dict, fields: tuple[str, ...]) -> bytes:
    vals = []
    for f in fields:
        v = rec.get(f)
        vals.append(int(v) if f in INT_FIELDS and v is not None else v)
    return _encode(vals).encode()


def record_hash(rec: dict) -> str:
    """The legacy digest (old field list): what records written before keyed links carry."""
    return hashlib.sha256(_canon(rec, LEGACY_FIELDS)).hexdigest()


def digest(rec: dict) -> str:
    """The digest of a keyed record (current field list, `prev_hash` included)."""
    return hashlib.sha256(_canon(rec, FIELDS)).hexdigest()


# The canonical form of a keyed record is the JSON list of FIELDS, whose first is `seq` and last
# `prev_hash`: the fields between depend on the record alone, so a writer encodes them before it
# takes the chain's head (outside the writers' lock) and adds the two once it holds it.
assert FIELDS[0] == "seq" and FIELDS[-1] == "prev_hash"
ROW_FIELDS = FIELDS[1:-1]
TRUNCATE = (*((f, 256) for f in ("actor", "ip", "fingerprint", "mac", "route", "action", "key_id", "result")),
            ("reason", 1000))
# Every text field with its length limit (None: the server's own short values, e.g. `at`, `plane`); `detail`
# is JSON text made with ensure_ascii, so it holds neither a NUL nor a surrogate.
_TEXT_FIELDS = (*TRUNCATE, *((f, None) for f in ROW_FIELDS
                             if f not in INT_FIELDS and f != "detail" and f not in dict(TRUNCATE)))
_INT_ROW_FIELDS = tuple(f for f in ROW_FIELDS if f in INT_FIELDS and f != "change")
_detail_json = encoder(sort_keys=True)


def make_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as the writer stores it: the fields of ROW_FIELDS only, integers as int, `change` as
    0/1, `detail` as its JSON text, texts made `storable` and long ones cut, `at` now unless given. Raises
    ValueError for an integer field that is not one (before the record joins a batch, so only its own
    request fails)."""
    get = rec.get
    row = {f: get(f) for f in ROW_FIELDS}
    if not row["at"]:
        row["at"] = timeutil.now_db()
    detail = row["detail"]
    row["detail"] = _detail_json(detail) if detail else "{}"
    change = row["change"]
    if change is not None:
        row["change"] = 1 if change else 0
    for f in _INT_ROW_FIELDS:
        v = row[f]
        if v is not None and v.__class__ is not int:
            row[f] = int(v)
    for f, n in _TEXT_FIELDS:
        v = row[f]
        if isinstance(v, str):
            v = storable(v)
            row[f] = v[:n] if n is not None and len(v) > n else v
    return row


def canon_body(row: dict) -> bytes:
    """The canonical form's fields between `seq` and `prev_hash`, as they appear in it (no brackets),
    of a row `make_row` made (its integers are already int: no per-field conversion here)."""
    return _encode([row[f] for f in ROW_FIELDS])[1:-1].encode()


def chained_digest(seq: int, body: bytes, prev: str) -> str:
    """`digest()` of the record whose `canon_body` is `body`, numbered `seq` and linked after `prev`."""
    return hashlib.sha256(b"[%d,%s,%s]" % (seq, body, _encode(prev).encode())).hexdigest()


def tagger(key: bytes):
    """`tag(key, ·)` with the key's HMAC state built once (a batch tags every record under one key)."""
    base = hmac.new(key, digestmod=hashlib.sha256)

    def tag_of(dig: str) -> str:
        h = base.copy()
        h.update(dig.encode())
        return TAG_PREFIX + h.hexdigest()
    return tag_of


def link_key(audit_key: bytes) -> bytes:
    """The key the tags are made with, apart from the key of body HMACs."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"skm audit link v1").derive(audit_key)


def tag(key: bytes, dig: str) -> str:
    return TAG_PREFIX + hmac.new(key, dig.encode(), hashlib.sha256).hexdigest()


def tag_ok(key: bytes, dig: str, value: str | None) -> bool:
    return value is not None and hmac.compare_digest(tag(key, dig), value)


def is_legacy(rec: dict) -> bool:
    return rec.get("tag") is None


def expected_digest(rec: dict, legacy: bool) -> str:
    return record_hash(rec) if legacy else digest(rec)


def to_api(r: dict) -> dict:
    try:
        detail = json.loads(r["detail"] or "{}")
    except ValueError:
        detail = {"unreadable": True}
    change = r.get("change")
    return {"seq": int(r["seq"]), "time": r["at"], "plane": r["plane"], "actor": r["actor"],
            "actorKind": r["actor_kind"], "ip": r["ip"], "fingerprint": r["fingerprint"], "mac": r["mac"],
            "method": r["method"], "route": r["route"], "action": r["action"],
            "projectId": None if r.get("project_id") is None else int(r["project_id"]),
            "keyStoreId": None if r["keystore_id"] is None else int(r["keystore_id"]),
            "keyId": r["key_id"], "change": None if change is None else bool(change), "status": r["status"],
            "result": r["result"], "reason": r["reason"], "detail": detail, "prevHash": r["prev_hash"],
            "hash": r["hash"], "tag": r.get("tag")}


def from_api(a: dict) -> dict:
    """The stored form of an exported record (for offline verification)."""
    detail = a.get("detail")
    change = a.get("change")
    return {"seq": a["seq"], "at": a["time"], "plane": a["plane"], "actor": a["actor"],
            "actor_kind": a["actorKind"], "ip": a.get("ip"), "fingerprint": a.get("fingerprint"),
            "mac": a.get("mac"), "method": a.get("method"), "route": a.get("route"), "action": a["action"],
            "project_id": a.get("projectId"), "keystore_id": a.get("keyStoreId"), "key_id": a.get("keyId"),
            "change": None if change is None else int(bool(change)), "status": a.get("status"),
            "result": a["result"], "reason": a.get("reason"),
            "detail": json.dumps(detail if detail is not None else {}, separators=(",", ":"), sort_keys=True),
            "prev_hash": a["prevHash"], "hash": a["hash"], "tag": a.get("tag")}
