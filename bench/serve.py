"""`skm server run` with two switches the benchmark compares before they are wired in for good.

    python -m bench.serve [--uvloop] [--authcache] -- server run --config FILE

--uvloop      run on uvloop (the change proposed for server/cli/cmd_server.py's run path)
--authcache   build the runtime with server.access.authcache.CachedClientAccess (the one-line
              change proposed for server/app.py build_runtime)
Without switches this is exactly `skm server run`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--authcache", action="store_true")
    a = p.parse_args(argv[:cut])
    if a.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if a.authcache:
        import server.app as app
        from server.access.authcache import CachedClientAccess
        build = app.build_runtime

        def build_runtime(config, storage, barrier=None):
            rt = build(config, storage, barrier)
            rt.access = CachedClientAccess(storage, config.trusted_proxies, events=rt.events)
            return rt
        app.build_runtime = build_runtime
    from server.cli.main import main as skm
    return skm(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
