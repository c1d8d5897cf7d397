"""The system-key server's append-only log of audit checkpoints (docs/audit.md).

Key servers whose certificate is on the allow-list POST signed checkpoints of their audit chain;
this host keeps them in `audit-checkpoints.jsonl` (0600, appended and fsynced, never rewritten by
any route), so whoever holds the key server's database cannot take back what was signed. A GET
returns the checkpoints signed by one public key. Only well-formed entries whose signature verifies
under the key they name are kept: nobody can fill the log with garbage in someone else's name.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from server import jsonlines
from server.audit.checkpoints import MAX_ENTRY_BYTES, check_entry

FILE = "audit-checkpoints.jsonl"


class CheckpointLog:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE
        self._lock = threading.Lock()      # appends come from worker threads

    def append(self, entry: dict) -> None:
        check_entry(entry)
        kept = {k: entry[k] for k in ("checkpoint", "sig", "pub")}
        if len(json.dumps(kept)) > MAX_ENTRY_BYTES:
            from server.errors import InvalidRequest
            raise InvalidRequest(f"a checkpoint is at most {MAX_ENTRY_BYTES} bytes")
        with self._lock:
            jsonlines.append(self.path, kept)

    def read(self, pub: str | None) -> list[dict]:
        return [e for e in jsonlines.read(self.path) if isinstance(e, dict) and (pub is None or e.get("pub") == pub)]
