"""What SQLite itself holds for a connection (sqlite3_db_status), read through the system libsqlite3
that Python's sqlite3 module is linked to.

CPython's `sqlite3.Connection` keeps its `sqlite3 *` handle as the first field after PyObject_HEAD;
the handle is checked (sqlite3_db_filename must name the database file) before anything is read.
"""
from __future__ import annotations

import ctypes
import os
import sqlite3

CACHE_USED, SCHEMA_USED, STMT_USED = 1, 2, 3       # SQLITE_DBSTATUS_*

_lib = ctypes.CDLL("libsqlite3.so.0")
_lib.sqlite3_db_filename.restype = ctypes.c_char_p
_lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.sqlite3_db_status.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_int]


def _handle(conn: sqlite3.Connection, path: str | None) -> int:
    db = ctypes.c_void_p.from_address(id(conn) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    assert db, "the sqlite3.Connection has no open handle"
    name = _lib.sqlite3_db_filename(db, b"main")
    assert name is not None and (path is None or os.path.realpath(name.decode()) == os.path.realpath(path)), \
        f"not the handle of {path}: {name!r} (CPython's sqlite3.Connection layout changed?)"
    return db


def db_status(conn: sqlite3.Connection, path: str | None, op: int) -> int:
    """Bytes SQLite holds for `conn` (the database file at `path`, when given) under SQLITE_DBSTATUS `op`."""
    cur, high = ctypes.c_int(), ctypes.c_int()
    rc = _lib.sqlite3_db_status(_handle(conn, path), op, ctypes.byref(cur), ctypes.byref(high), 0)
    assert rc == 0, f"sqlite3_db_status({op}) returned {rc}"
    return cur.value


def statement_bytes(storage) -> int:
    """Compiled statements held by every connection of a SQLiteStorage (server/storage/sqlite.py)."""
    return sum(db_status(c._conn, storage.path, STMT_USED) for c in storage._all)
