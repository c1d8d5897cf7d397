"""Open the configured backend from its URL.

Here rather than in base.py: the backends import base (Storage, Executor), so the one place
that names both backends sits above them.
"""
from __future__ import annotations

from server.errors import ConfigError
from server.storage.base import Storage
from server.storage.postgres import PostgresStorage
from server.storage.sqlite import SQLiteStorage


def open_storage(url: str) -> Storage:
    if url.startswith("sqlite:///"):
        return SQLiteStorage(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStorage(url)
    raise ConfigError("storage must be sqlite:///PATH or postgresql://...; got an unknown scheme")
