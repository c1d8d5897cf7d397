"""`skm server run|init|status`."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from server import logs
from server.cli.common import add_connection_args, connection, output
from server.config import load
from server.settings import ServerConfig


def load_server_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return load(ServerConfig, args.config, overrides=overrides)


def register(sub) -> None:
    p = sub.add_parser("server", help="run and initialise the key server",
                       description="Run, initialise and inspect the key server.")
    s = p.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    s.required = True

    run = s.add_parser("run", help="serve the data and management planes",
                       description="Start the key server: it comes up sealed and serves once it has the system key.")
    _config_args(run)
    run.set_defaults(func=_run)

    init = s.add_parser("init", help="create data dir, root key, system key, dev CA, first project and operator",
                        description="Initialise a fresh key server. Prints the appkey and a bootstrap operator "
                                    "token once: store the token safely.")
    _config_args(init)
    init.add_argument("--project", default="default", help="name of the first project")
    init.add_argument("--operator", default="admin", help="name of the bootstrap admin operator")
    init.add_argument("--hostname", action="append", default=[],
                      help="extra DNS name or IP for the server certificate (repeatable)")
    init.set_defaults(func=_init)

    st = s.add_parser("status", help="show whether the server is sealed and its system-key versions",
                      description="Ask the management listener for its state.")
    add_connection_args(st)
    st.set_defaults(func=_status)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (every value also from SKM_* variables)")
    p.add_argument("--data-dir", help="data directory (default ./.skm)")


async def _init(args: argparse.Namespace) -> int:
    from server.init import init_server
    cfg = load_server_config(args)
    res = await init_server(cfg, project=args.project, operator=args.operator, hostnames=args.hostname)
    print(f"initialised {res.data_dir}")
    print(f"  appkey:          {res.appkey}")
    print(f"  CA certificate:  {res.ca_cert}")
    print(f"  operator:        {res.operator}")
    print(f"  operator token:  {res.token}")
    print("The token is shown only this once; export it as SKM_TOKEN for the CLI.")
    return 0


async def _run(args: argparse.Namespace) -> int:
    from server.app import KeyServer
    cfg = load_server_config(args)
    logs.configure(cfg.log_format, cfg.log_level)
    server = KeyServer(cfg)
    await server.start()
    print(f"key server: data plane https://{cfg.data.host}:{server.data_port}, "
          f"management https://{cfg.mgmt.host}:{server.mgmt_port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


async def _status(args: argparse.Namespace) -> int:
    import aiohttp
    from pathlib import Path
    from server.access.tls import client_context
    conn = connection(args)
    ssl_ctx = client_context(Path(conn.ca)) if conn.ca else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as s:
        async with s.get(f"{conn.addr}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as r:
            data = await r.json(content_type=None)
    output(args, data, title="key server")
    return 0 if not data.get("sealed") else 6
