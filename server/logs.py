"""structlog set-up shared by every process.

A processor drops fields named like secrets as a second line of defence: the
first is never passing values to a logger at all.

structlog is imported when a line is to be written, not when a module asks for a logger: with its
console renderer it pulls in rich (about 0.1 s), which a CLI command that logs nothing at its level
(`skm backup create` / `restore`, measured against C tools) should not pay. `configure()` records the
set-up and applies it when structlog is first needed (at once if it already is); until then a call
below the configured level is dropped without importing anything.
"""
from __future__ import annotations

import re
import sys
from contextvars import ContextVar
from typing import Any

_SECRETISH = re.compile(r"(secret|plaintext|password|passwd|token|key|pin|material|signature|ciphertext)", re.I)
# Field names that contain "key" but only ever hold identifiers.
_ALLOWED = frozenset({"key_id", "keyid", "key_store", "keystore", "keystore_id", "key_type", "key_version",
                      "key_spec", "token_id", "key_label", "token_label", "system_key_version", "keys"})
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40, "critical": 50,
           "fatal": 50, "msg": 20}
_pending: tuple[str, str, Any] | None = None      # configure()'s arguments, not yet applied
_threshold: int | None = None                     # the configured level, once configure() ran
_REQUEST_ID: ContextVar[str | None] = ContextVar("skm_request_id", default=None)   # bind_request_id()


def drop_secret_fields(_logger, _name, event_dict: dict) -> dict:
    for k in list(event_dict):
        if k in ("event", "level", "timestamp", "logger") or k in _ALLOWED:
            continue
        if _SECRETISH.search(k):
            event_dict[k] = "[redacted]"
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    global _pending, _threshold
    _pending = (fmt, level, stream or sys.stderr)
    _threshold = _LEVELS.get(level.lower(), 20)
    if "structlog" in sys.modules:
        _apply()


def _apply() -> None:
    global _pending
    if _pending is None:
        return
    import logging

    import structlog
    fmt, level, stream = _pending
    _pending = None
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_request_id,
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


def _drop(*_args: Any, **_kw: Any) -> None:
    return None


class _Logger:
    """structlog's logger for `name`, made on first use (see the module's docstring)."""

    __slots__ = ("_name", "_real")

    def __init__(self, name: str) -> None:
        self._name = name
        self._real = None

    def _logger(self):
        if self._real is None or _pending is not None:
            import structlog
            _apply()
            self._real = structlog.get_logger(self._name)
        return self._real

    def __getattr__(self, attr: str):
        if self._real is None and _threshold is not None and _LEVELS.get(attr, 100) < _threshold \
                and "structlog" not in sys.modules:
            return _drop                # below the configured level: nothing to write, nothing to import
        return getattr(self._logger(), attr)


def bind_request_id(rid: str) -> None:
    """Name the current request in every line it logs.

    A context variable of our own, read by a processor of our own: structlog's `bind_contextvars` (and
    the `clear_contextvars` it needs between requests on one connection) cost ~2 µs a request."""
    _REQUEST_ID.set(rid)


def _add_request_id(_logger, _name, event_dict: dict) -> dict:
    rid = _REQUEST_ID.get()
    if rid is not None:
        event_dict.setdefault("request_id", rid)
    return event_dict


def get(name: str):
    return _Logger(name)
