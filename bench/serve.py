"""`skm server run` on uvloop, which the benchmark compares before it is wired in for good.

    python -m bench.serve [--uvloop] -- server run --config FILE

--uvloop      run on uvloop (the change proposed for server/cli/cmd_server.py's run path)
Without the switch this is exactly `skm server run`.
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
    a = p.parse_args(argv[:cut])
    if a.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from server.cli.main import main as skm
    return skm(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
