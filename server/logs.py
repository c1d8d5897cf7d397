"""structlog set-up shared by every process.

A processor drops fields named like secrets as a second line of defence: the
first is never passing values to a logger at all.
"""
from __future__ import annotations

import logging
import re
import sys

import structlog

_SECRETISH = re.compile(r"(secret|plaintext|password|passwd|token|key|pin|material|signature|ciphertext)", re.I)
# Field names that contain "key" but only ever hold identifiers.
_ALLOWED = frozenset({"key_id", "keyid", "key_store", "keystore", "keystore_id", "key_type", "key_version",
                      "key_spec", "token_id", "key_label", "token_label", "system_key_version", "keys"})


def drop_secret_fields(_logger, _name, event_dict: dict) -> dict:
    for k in list(event_dict):
        if k in ("event", "level", "timestamp", "logger") or k in _ALLOWED:
            continue
        if _SECRETISH.search(k):
            event_dict[k] = "[redacted]"
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_secret_fields,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str):
    return structlog.get_logger(name)
