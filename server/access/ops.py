"""The registry of change operations (name -> the function that applies it), apart from ChangeGate.

The key layer registers its own operations (server/keys/stores.py: keystore.delete); this module
imports nothing, so importing the key service does not pull in the access layer (operators, caches,
the runtime) that ChangeGate's module reaches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from server.access.changes import ChangeGate

Op = Callable[["ChangeGate", dict, str], Awaitable[Any]]
OPS: dict[str, Op] = {}


def op(name: str):
    def deco(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return deco
