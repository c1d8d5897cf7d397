"""`skm sidecar --config FILE`: run the per-host sidecar."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "sidecar", help="run the per-host sidecar (credential-free local socket for apps)",
        description="Run the sidecar: it holds the host certificate, attests the host's MAC address, keeps an "
                    "mTLS connection pool to the key server(s), caches secrets briefly with push invalidation, "
                    "and serves local apps on a Unix socket with the client-API paths. Every setting can also "
                    "be given as an SKM_SIDECAR_* environment variable (e.g. SKM_SIDECAR_APPKEY, "
                    "SKM_SIDECAR_UPSTREAM_URLS, SKM_SIDECAR_LISTEN_SOCKET).")
    p.add_argument("--config", "-c", help="TOML config file (every value also from SKM_SIDECAR_* variables)")
    p.add_argument("--check", action="store_true",
                   help="load and validate the configuration and the host certificate, then exit")
    p.set_defaults(func=_run)


async def _run(args: argparse.Namespace) -> int:
    from sidecar.settings import load_config
    cfg = load_config(args.config)
    if args.check:
        import asyncio
        from sidecar.upstream import load_identity
        ident = await asyncio.to_thread(load_identity, cfg)
        print(f"configuration ok; host certificate valid until {ident.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        return 0
    from sidecar.app import run
    return await run(cfg)
