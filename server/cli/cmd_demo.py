"""`skm demo`."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole stack and show an app using it",
                       description="Start the system-key server (its own process), the key server on the embedded default "
                                   "(SQLite, file root key, dev CA) and a sidecar; create a demo key store and keys, "
                                   "and walk an app through secrets, encryption, envelope encryption, signing and "
                                   "rotation via the sidecar's Unix socket.")
    p.add_argument("--once", action="store_true", help="run the flow in a temp dir and exit (non-zero if a step fails)")
    p.add_argument("--data-dir", help="data directory (default ./.skm; with --once a temp dir)")
    p.add_argument("--port", type=int, default=8443,
                   help="data-plane port (management is the next one, the system-key server the one before); "
                        "0 picks three free ports")
    p.set_defaults(func=_run)


async def _run(args: argparse.Namespace) -> int:
    from server.demo import run_demo
    if not (args.port == 0 or 2 <= args.port <= 65534):
        raise SystemExit("error: --port must be 0 (free ports) or 2..65534 (it uses the port before and after too)")
    near = (lambda offset: args.port + offset) if args.port else (lambda offset: 0)
    # SIGINT and SIGTERM stop the demo and everything it started (run_demo handles both).
    return await run_demo(args.data_dir, args.once, port_data=near(0), port_mgmt=near(1), port_systemkey=near(-1))
