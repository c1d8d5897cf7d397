"""Append-only JSON-lines files (audit checkpoints, the system-key server's logs): durable appends that
never interleave, and tolerant reads. Blocking: callers run them in a thread."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append(path: Path, obj: Any) -> int:
    """One line, one write() with O_APPEND (lines from several processes never interleave), fsynced;
    the file is made 0600. Returns the line's length in bytes."""
    line = (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(line)


def read(path: Path) -> list[Any]:
    """Every line that parses (a torn last line after a crash is skipped); [] when there is no file."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out
