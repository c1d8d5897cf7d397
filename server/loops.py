"""Which asyncio event loop a long-running process uses (`event_loop = "auto" | "uvloop" | "asyncio"`).

uvloop (libuv) cut the key server's CPU per request by about a fifth in `make bench`
(bench/README.md), so "auto" takes it when it is installed and falls back to the
standard loop otherwise; "uvloop" insists on it, "asyncio" refuses it.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from server.errors import ConfigError

CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for asyncio.Runner, or None for the standard loop."""
    if choice not in CHOICES:
        raise ConfigError(f"event_loop must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop = \"uvloop\" but uvloop is not installed: pip install uvloop, "
                              "or set event_loop = \"auto\"") from None
        return None
    return uvloop.new_event_loop


def run(main, choice: str):
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
