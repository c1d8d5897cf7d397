"""Which asyncio event loop a long-running process uses (`event_loop = "auto" | "uvloop" | "asyncio"`).

uvloop (libuv) cut the key server's CPU per request by about a fifth in `make bench`
(bench/README.md), so "auto" takes it when it is installed and falls back to the
standard loop otherwise; "uvloop" insists on it, "asyncio" refuses it.
"""
from __future__ import annotations

import asyncio
import gc
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


# Cyclic-GC generation 0 is collected after this many more tracked objects were made than freed
# (CPython's default: 700). A request leaves a few such objects for the collector (cycles among
# aiohttp's and asyncio's per-request objects); at 700 the key server ran a collection every ~120
# secret reads, 3-4.5 µs per request in all (timed with gc.callbacks under `ab -c 64`); at 10,000
# none ran in 6 s runs, and at most ~10,000 objects (a few MB) wait for one.
GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once start-up is done: what it made (modules, classes, TLS contexts, caches) lives as long as
    the process, so it is frozen out of every later collection (a full one otherwise stalls every
    request for 10-20 ms), and young collections run less often (GEN0_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
