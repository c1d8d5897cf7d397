"""`skm server run|init|status|export-keyring`."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from server import logs
from server.cli.common import add_connection_args, connection, output
from server.config import load
from server.settings import ServerConfig


def load_server_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "workers", None):
        overrides["workers"] = args.workers
    return load(ServerConfig, args.config, overrides=overrides)


def register(sub) -> None:
    p = sub.add_parser("server", help="run and initialise the key server",
                       description="Run, initialise and inspect the key server.")
    s = p.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    s.required = True

    run = s.add_parser("run", help="serve the data and management planes",
                       description="Start the key server: it comes up sealed and serves once it has the system key.")
    _config_args(run)
    run.add_argument("--workers", type=int, metavar="N",
                     help="data-plane processes sharing the data port (SO_REUSEPORT); worker 0 also serves "
                          "management and runs the jobs (default: the config's `workers`, 1)")
    run.set_defaults(func=_run_on_loop)

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
                      description="Ask the management listener for its state: sealed and why (/healthz), and "
                                  "with an operator token the system-key versions and records per version. "
                                  "Exit code 6 while sealed.")
    add_connection_args(st)
    st.set_defaults(func=_status)

    ex = s.add_parser("export-keyring", help="move the wrapped keyring off this host for a system-key server",
                      description="Write the wrapped system-key keyring to FILE for `skm systemkey init "
                                  "--keyring FILE` and delete the local copy, so the root key and the wrapped "
                                  "system key no longer sit on one host. Then set systemkey.source = \"remote\" "
                                  "and systemkey.urls in the key server's config.")
    _config_args(ex)
    ex.add_argument("--out", "-o", required=True, help="file to write (created 0600; must not exist)")
    ex.add_argument("--keep-local", action="store_true",
                    help="keep the local keyring too (testing only: it defeats the separation)")
    ex.set_defaults(func=_export_keyring)


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


def _run_on_loop(args: argparse.Namespace) -> int:
    """`skm server run` on the configured event loop (uvloop when installed, by default)."""
    from server import loops
    cfg = load_server_config(args)
    return loops.run(_run(args, cfg), cfg.event_loop)


async def _run(args: argparse.Namespace, cfg: ServerConfig) -> int:
    from server import loops
    from server.workers import WorkerPlace
    logs.configure(cfg.log_format, cfg.log_level)
    place = WorkerPlace.from_env()
    if place is None and cfg.workers != 1:
        return await _supervise(cfg, _worker_argv(args))     # without loading the server: it only watches
    from server.app import KeyServer
    server = KeyServer(cfg, place=place)
    try:
        await server.start()
    except BaseException:
        # A refused start (wrong root key or PIN) must release storage too, or its thread keeps us alive.
        await server.stop()
        raise
    loops.settle_heap()
    if place is not None:
        place.ready(server.data_port, server.mgmt_port)     # the supervisor prints the one listening line
    else:
        print(f"key server: data plane https://{cfg.data.host}:{server.data_port}, "
              f"management https://{cfg.mgmt.host}:{server.mgmt_port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """`skm server run` as a worker runs it: the same config and data dir (SKM_* variables are inherited)."""
    argv = ["server", "run"]
    if args.config:
        argv += ["--config", str(args.config)]
    if getattr(args, "data_dir", None):
        argv += ["--data-dir", str(args.data_dir)]
    return argv


async def _supervise(cfg: ServerConfig, argv: list[str]) -> int:
    """`workers > 1`: start the workers on one data port and keep them running (server/workers.py)."""
    from server.errors import ConfigError
    from server.workers import MAX_WORKERS, Supervisor, WorkerFailed, reserve_port
    if not 1 <= cfg.workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}")
    placeholder = reserve_port(cfg.data.host, cfg.data.port)
    port = placeholder.getsockname()[1]
    sup = Supervisor(cfg.workers, cfg.data.host, port, cfg.data_path / "run", argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sup.start()
    except WorkerFailed as e:
        print(f"error: {e}; see its messages above", file=sys.stderr)
        return e.code or 1
    except asyncio.TimeoutError:
        print("error: a worker did not become ready in time; see its messages above", file=sys.stderr)
        return 1
    finally:
        placeholder.close()      # the workers hold the port now
    print(f"key server: data plane https://{cfg.data.host}:{port}, management https://{cfg.mgmt.host}:"
          f"{sup.mgmt_port} ({cfg.workers} workers)", file=sys.stderr, flush=True)
    try:
        await sup.watch(stop)
    finally:
        await sup.stop()
    return 0


async def _status(args: argparse.Namespace) -> int:
    import aiohttp
    from pathlib import Path
    from server.access.tls import client_context
    from server.cli.common import MgmtClient
    from server.errors import SKMError
    conn = connection(args)
    ssl_ctx = client_context(Path(conn.ca)) if conn.ca else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as s:
        async with s.get(f"{conn.addr}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as r:
            data = await r.json(content_type=None)
    if not data.get("sealed") and conn.token:
        # Versions and records per version need an operator; health alone does not.
        try:
            async with MgmtClient(conn) as c:
                sysst = await c.call("GET", "/system/status")
            data.update({"system_key_version": sysst["currentVersion"], "system_key_versions": sysst["versions"],
                         "records_by_version": sysst["recordsByVersion"], "rewrap": sysst["rewrap"]["state"]})
        except SKMError as e:
            data["system_status"] = f"unavailable ({e.message})"
    output(args, data, title="key server")
    return 0 if not data.get("sealed") else 6


def export_keyring(cfg: ServerConfig, out: Path, *, keep_local: bool = False) -> Path:
    """Copy the local wrapped keyring to `out` (0600, new file) and remove the local copy; returns the source."""
    import os
    from server.barrier.keyring import load_keyring_file
    from server.barrier.rootkey import write_private_file
    from server.errors import ConfigError
    src = cfg.system_key_path()
    if not src.exists():
        raise ConfigError(f"no local keyring at {src}: already exported, or not initialised")
    load_keyring_file(src)  # refuse to export something malformed
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file")
    write_private_file(out, src.read_bytes())
    if not keep_local:
        os.remove(src)
    return src


def _export_keyring(args: argparse.Namespace) -> int:
    from server.access.pki import fingerprint
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    cfg = load_server_config(args)
    src = export_keyring(cfg, Path(args.out), keep_local=args.keep_local)
    cert_path = cfg.pki_dir() / "server.pem"
    print(f"wrote {args.out}" + ("" if args.keep_local else f" and removed {src}"))
    print("On the system-key host:")
    print(f"  skm systemkey init --keyring {args.out}   (then delete {args.out})")
    if cert_path.exists():
        fp = fingerprint(x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(Encoding.DER))
        print(f"  skm systemkey allow {fp}")
    print('In this key server\'s config: [systemkey] source = "remote", urls = ["https://SYSTEMKEY-HOST:8445"]')
    return 0
