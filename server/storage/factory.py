"""Open the configured backend from its URL.

Here rather than in base.py: the backends import base (Storage, Executor), so the one place
that names both backends sits above them.
"""
from __future__ import annotations

from server.errors import ConfigError
from server.storage.base import Storage


def open_storage(url: str) -> Storage:
    # Each backend's driver imported when it is used (asyncpg costs an offline SQLite tool ~30 ms).
    if url.startswith("sqlite:///"):
        from server.storage.sqlite import SQLiteStorage
        return SQLiteStorage(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        from server.storage.postgres import PostgresStorage
        return PostgresStorage(url)
    raise ConfigError("storage must be sqlite:///PATH or postgresql://...; got an unknown scheme")
