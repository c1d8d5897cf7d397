"""Verifying an audit export with nothing but the checkpoint public key (`skm audit verify --offline`).

An export is JSON lines: records (as the management API gives them) then signed checkpoints. The
digests chain, so each checkpoint inside the export pins every exported record before it; a
checkpoint past the export's last record means the export (or the log it came from) lost its end.
Tags cannot be checked here (they need the audit key): what is pinned is what checkpoints cover.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from server.audit.chain import VerifyResult, walk_export
from server.audit.checkpoints import load_pub_pem, signed_by
from server.audit.record import from_api
from server.errors import ConfigError, InvalidRequest


def _read(path: Path) -> tuple[list[dict], list[dict], int]:
    records, checkpoints, bad = [], [], 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConfigError(f"no export at {path}; write one with `skm audit export -o FILE`") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                raise InvalidRequest(f"line {n} of {path} is not JSON: not an export of `skm audit export`") from None
            if isinstance(obj, dict) and "checkpoint" in obj:
                checkpoints.append(obj)
            elif isinstance(obj, dict) and "seq" in obj:
                try:
                    records.append(from_api(obj))
                except KeyError as e:
                    raise InvalidRequest(f"line {n} of {path} is a record without {e}") from None
            else:
                bad += 1
    return records, checkpoints, bad


def verify_export_sync(export: Path, pubkey: Path) -> VerifyResult:
    try:
        pub = load_pub_pem(Path(pubkey).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"no public key at {pubkey}; get it with `skm audit pubkey > FILE`") from None
    records, entries, bad = _read(Path(export))
    good = [e for e in entries if isinstance(e.get("checkpoint"), dict) and signed_by(e, pub)]
    forged = len(entries) - len(good)
    epochs = {e["checkpoint"]["epoch"] for e in good}
    if len(epochs) > 1:
        # Several epochs: the newest (by time) is the one the export's chain belongs to.
        newest = max(good, key=lambda e: e["checkpoint"]["at"])["checkpoint"]["epoch"]
        good = [e for e in good if e["checkpoint"]["epoch"] == newest]
    kf = {e["checkpoint"].get("keyedFrom") for e in good} - {None}
    res = walk_export(records, good, keyed_from=int(next(iter(kf))) if len(kf) == 1 else None)
    if forged:
        res.warnings.append(f"{forged} checkpoint line(s) are not signed by this public key and were ignored")
    if bad:
        res.warnings.append(f"{bad} line(s) are neither records nor checkpoints and were ignored")
    if not records:
        res.ok, res.reason = False, "the export holds no records"
    return res


async def verify_export(export: Path, pubkey: Path) -> VerifyResult:
    return await asyncio.to_thread(verify_export_sync, export, pubkey)
