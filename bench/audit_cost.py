"""What keyed audit links and signed checkpoints add to a request (issue 14: ≤ 5 % of secret-read CPU).

Two measurements, both in `make bench`:

* server against server: system `skm-unkeyed` is the same key server started through
  `bench/serve.py --unkeyed-audit` (the writer of before keyed links: digest only, no tag, no periodic
  checkpoint; the server itself has no such switch, one an insider could flip), run interleaved with
  `skm` on secret reads; the ratio of their server CPU per request is the cost as users pay it.
  It is only as precise as the machine is quiet (runs drift a few %).
* the writer's own code in this process, on records shaped like a secret read's: the old unkeyed
  digest chain against digest + HMAC tag, plus one signed checkpoint (Ed25519 and a fsynced append)
  spread over `checkpoint_every` records, set against `skm`'s secret-read CPU per request. Precise,
  and what bounds the first.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.audit.checkpoints import FileSink, sign
from server.audit.record import GENESIS, digest, link_key, record_hash, tag


def _rows(n: int) -> list[dict]:
    base = {"at": "2026-11-29T10:00:00.000000Z", "plane": "data", "actor": "appkey", "actor_kind": "client",
            "ip": "127.0.0.1", "fingerprint": "ab" * 32, "mac": None, "method": "GET",
            "route": "/keymanager/{version}/appkey/{appkey}/secrets/{keyid}", "action": "secret.read",
            "project_id": 1, "keystore_id": 1, "key_id": "0123456789abcdef0123456789abcdef", "change": 0,
            "status": 200, "result": "ok", "reason": None,
            "detail": '{"keyName":"db-password","keyStoreName":"bench","requestId":"0123456789abcdef"}'}
    return [{**base, "seq": i + 1} for i in range(n)]


def _chain(rows: list[dict], keyed: bytes | None) -> float:
    prev = GENESIS
    t0 = time.perf_counter()
    for r in rows:
        r["prev_hash"] = prev
        if keyed is None:
            prev = record_hash(r)
        else:
            prev = digest(r)
            tag(keyed, prev)
    return (time.perf_counter() - t0) / len(rows) * 1e6


@dataclass
class AuditCost:
    unkeyed_us: float            # per record, the old chain
    keyed_us: float              # per record, digest + tag
    checkpoint_us: float         # one signed checkpoint, signed and stored
    checkpoint_every: int
    added_us: float              # per record: (keyed - unkeyed) + checkpoint / every
    secret_read_cpu_us: float | None = None
    added_pct: float | None = None
    unkeyed_server_cpu_us: float | None = None    # skm-unkeyed's secret-read CPU per request, same run
    server_added_pct: float | None = None         # skm against skm-unkeyed

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def measure(n: int = 20000, checkpoints: int = 50, every: int = 1000, rounds: int = 5) -> AuditCost:
    key = link_key(os.urandom(32))
    rows = _rows(n)
    unkeyed = min(_chain(rows, None) for _ in range(rounds))
    keyed = min(_chain(rows, key) for _ in range(rounds))
    sk = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as d:
        sink = FileSink(Path(d) / "checkpoints.jsonl")
        t0 = time.perf_counter()
        for i in range(checkpoints):
            sink._append(sign(sk, {"v": 1, "epoch": "e", "seq": i, "digest": "0" * 64, "at": "t", "kind": "periodic",
                                   "keyedFrom": 1}))
        cp = (time.perf_counter() - t0) / checkpoints * 1e6
    return AuditCost(unkeyed, keyed, cp, every, (keyed - unkeyed) + cp / every)


def against(cost: AuditCost, rows: list[dict]) -> AuditCost:
    """Set the added cost against the key server's secret-read CPU per request of the same run."""
    mine = next((r for r in rows if r["workload"] == "secret-read" and r["system"] == "skm"), None)
    base = next((r for r in rows if r["workload"] == "secret-read" and r["system"] == "skm-unkeyed"), None)
    if mine and mine.get("cpu_us_per_req"):
        cost.secret_read_cpu_us = mine["cpu_us_per_req"]
        cost.added_pct = 100.0 * cost.added_us / mine["cpu_us_per_req"]
        if base and base.get("cpu_us_per_req"):
            cost.unkeyed_server_cpu_us = base["cpu_us_per_req"]
            cost.server_added_pct = 100.0 * (mine["cpu_us_per_req"] / base["cpu_us_per_req"] - 1)
    return cost


def line(cost: AuditCost) -> str:
    pct = f"{cost.added_pct:.2f} % of secret-read CPU ({cost.secret_read_cpu_us:.0f} µs)" \
        if cost.added_pct is not None else "(no secret-read row to compare with)"
    server = (f"server against server: secret read {cost.unkeyed_server_cpu_us:.0f} → "
              f"{cost.secret_read_cpu_us:.0f} µs CPU/req ({cost.server_added_pct:+.1f} %); "
              if cost.server_added_pct is not None else "")
    return (f"audit: keyed links + checkpoints: {server}in process they add {cost.added_us:.2f} µs per record "
            f"(chain {cost.unkeyed_us:.2f} → {cost.keyed_us:.2f} µs, a checkpoint {cost.checkpoint_us:.0f} µs "
            f"per {cost.checkpoint_every} records): {pct}; target ≤ 5 %")
