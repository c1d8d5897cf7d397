"""`skm server run` with a change the benchmark compares against the server as it is.

    python -m bench.serve [--uvloop] [--unkeyed-audit] -- server run --config FILE

--uvloop          run on uvloop (how the uvloop default was measured before it was wired in)
--unkeyed-audit   the audit writer as it was before keyed links (issue 14): records chained by digest
                  only, no HMAC tag, no periodic checkpoints. A benchmark baseline only: the server
                  itself has no such switch (one an insider could flip would defeat the keyed chain),
                  and its log does not verify.
Without a switch this is exactly `skm server run`.
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
    p.add_argument("--unkeyed-audit", action="store_true")
    a = p.parse_args(argv[:cut])
    if a.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if a.unkeyed_audit:
        from server.audit import checkpoints, log
        log.tagger = lambda key: (lambda digest: None)          # no HMAC per record
        checkpoints.Checkpointer.nudge = lambda self, seq: None  # no periodic checkpoint ...
        emit = checkpoints.Checkpointer.emit

        async def start_and_final_only(self, kind, extra=None):
            return None if kind == "periodic" else await emit(self, kind, extra)
        checkpoints.Checkpointer.emit = start_and_final_only   # ... by count or by time
    from server.cli.main import main as skm
    return skm(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
