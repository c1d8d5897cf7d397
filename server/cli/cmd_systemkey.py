"""`skm systemkey run|init|allow|revoke|list|rotate|retire|status`: the system-key server.

Every command but `run` is local to the system-key host (nothing here is reachable
over the network). `rotate` needs the root key: it runs where the root key is
usable (`--rootkey-config` names a key-server config whose [rootkey] section says
which), adds a version wrapped by it, and the system-key server never sees either.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from server.cli.common import Col, listing, output
from server.errors import ConfigError
from server.systemkey import admin
from server.systemkey.settings import SystemKeyServerConfig, load


def register(sub) -> None:
    p = sub.add_parser("systemkey", help="run and administer the system-key server",
                       description="The system-key server holds the system key wrapped by the root key and serves "
                                   "it over mTLS to allow-listed key servers.")
    s = p.add_subparsers(dest="systemkey_command", metavar="SUBCOMMAND")
    s.required = True

    run = s.add_parser("run", help="serve the wrapped keyring over mTLS",
                       description="Start the system-key server (TLS 1.2+, client certificate required).")
    _config(run)
    run.set_defaults(func=_run)

    init = s.add_parser("init", help="create the state dir from a wrapped keyring",
                        description="Create the system-key server's state from a keyring exported with "
                                    "`skm server export-keyring`. With --pki, also issue this server's TLS "
                                    "certificate from that dev CA and trust the CA for key-server clients.")
    _config(init)
    init.add_argument("--keyring", required=True, help="wrapped keyring file (JSON) exported by the key server")
    init.add_argument("--pki", help="dev PKI dir holding ca.pem and ca-key.pem (e.g. the key server's "
                                    "<data_dir>/pki) to issue this server's certificate from")
    init.add_argument("--hostname", action="append", default=[],
                      help="extra DNS name or IP for this server's certificate (repeatable; with --pki)")
    init.add_argument("--allow", action="append", default=[], metavar="CERT_OR_FINGERPRINT",
                      help="allow-list a key-server certificate right away (repeatable)")
    init.set_defaults(func=_init)

    allow = s.add_parser("allow", help="allow a key-server certificate to fetch the keyring",
                         description="Add a key-server certificate (PEM file or SHA-256 fingerprint) to the "
                                     "allow-list; takes effect on the next fetch.")
    _config(allow)
    allow.add_argument("fingerprint", help="SHA-256 fingerprint (hex, colons allowed) or a PEM certificate file")
    allow.add_argument("--note", default="", help="a note kept beside the fingerprint")
    allow.set_defaults(func=_allow)

    revoke = s.add_parser("revoke", help="remove a key-server certificate from the allow-list",
                          description="Remove a fingerprint from the allow-list; the next fetch is refused.")
    _config(revoke)
    revoke.add_argument("fingerprint", help="SHA-256 fingerprint or a PEM certificate file")
    revoke.set_defaults(func=_revoke)

    ls = s.add_parser("list", help="list the allow-list", description="List allow-listed key-server certificates.")
    _config(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    rot = s.add_parser("rotate", help="add a new system-key version (needs the root key)",
                       description="Add a system-key version wrapped by the root key and make it current. Key "
                                   "servers pick it up on their next fetch or `skm barrier refresh`; then "
                                   "`skm barrier rewrap` re-seals every record under it.")
    _config(rot)
    _rootkey_args(rot)
    rot.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rot.set_defaults(func=_rotate)

    ret = s.add_parser("retire", help="retire a system-key version no record uses",
                       description="Mark a version retired: key servers stop unwrapping it. Run it only after "
                                   "`skm barrier status` shows no record on it.")
    _config(ret)
    ret.add_argument("version", type=int)
    ret.set_defaults(func=_retire)

    st = s.add_parser("status", help="versions, allow-list size and fetch count",
                      description="Show the system-key server's state (no key material).")
    _config(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=_status)


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="system-key server TOML config (values also from SKM_SYSTEMKEY_*)")
    p.add_argument("--data-dir", help="state directory (default ./.skm-systemkey)")


def _rootkey_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("root key (it never leaves this command)")
    g.add_argument("--rootkey-config", help="key-server TOML config whose [rootkey] section names the root key "
                                            "(file path or PKCS#11 token); default: SKM_* variables")
    g.add_argument("--server-data-dir", help="the key server's data dir (for the default root key path)")


def load_config(args: argparse.Namespace) -> SystemKeyServerConfig:
    overrides = {"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}
    return load(args.config, **overrides)


def root_key_from(args: argparse.Namespace):
    """The root-key provider named by --rootkey-config (a key-server config)."""
    from server.barrier.providers import make_provider
    from server.config import load as load_any
    from server.settings import ServerConfig
    overrides = {"data_dir": args.server_data_dir} if getattr(args, "server_data_dir", None) else {}
    cfg = load_any(ServerConfig, args.rootkey_config, overrides=overrides or None)
    return make_provider(cfg.rootkey, cfg.root_key_path())


def issue_certificate(cfg: SystemKeyServerConfig, pki_dir: Path, hostnames: list[str] | None = None) -> Path:
    """Issue this server's certificate from a dev CA into <data_dir>/pki and trust that CA for clients."""
    import shutil

    from server.access.pki import DevPKI, _is_ip, cert_pem, key_pem, write_pem
    src = DevPKI(Path(pki_dir))
    if not src.exists():
        raise ConfigError(f"{pki_dir} holds no dev CA (ca.pem and ca-key.pem)")
    ca = src.load_ca()
    cert_path, key_path, ca_path = cfg.tls_files()
    names = ["localhost", *(hostnames or [])]
    cert, key = ca.issue("systemkey", server=True, dns=[n for n in names if not _is_ip(n)],
                         ips=["127.0.0.1", *[n for n in names if _is_ip(n)]], days=365)
    write_pem(cert_path, cert_pem(cert), private=False)
    write_pem(key_path, key_pem(key), private=True)
    ca_path.parent.mkdir(parents=True, exist_ok=True)
    if ca_path.resolve() != src.ca_cert.resolve():
        shutil.copyfile(src.ca_cert, ca_path)
    return cert_path


async def _run(args: argparse.Namespace) -> int:
    from server import logs
    from server.systemkey.app import serve
    cfg = load_config(args)
    logs.configure(cfg.log_format, cfg.log_level)
    runner, port = await serve(cfg)
    print(f"system-key server: https://{cfg.host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def _init(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    path = admin.init_from_file(cfg, args.keyring)
    print(f"initialised {cfg.data_path} (keyring {path})")
    if args.pki:
        print(f"  certificate: {issue_certificate(cfg, Path(args.pki), args.hostname)}")
    for item in args.allow:
        admin.allow(cfg, item)
    print(f"  allow-listed key servers: {len(admin.allowed(cfg))}")
    if not Path(args.keyring).samefile(path):
        print(f"Delete {args.keyring} now: the keyring belongs on this host only.")
    return 0


def _allow(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    added = admin.allow(cfg, args.fingerprint, args.note)
    print("allowed" if added else "already allowed")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if not admin.revoke(cfg, args.fingerprint):
        print("error: that fingerprint is not on the allow-list", file=sys.stderr)
        return 4
    print("revoked")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = [{"fingerprint": fp, "note": note} for fp, note in admin.allowed(load_config(args))]
    listing(args, rows, [Col("fingerprint", "fingerprint", keep=True), Col("note", "note", wrap=True)], rows,
            title="allowed key servers")
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    root = await asyncio.to_thread(root_key_from, args)
    try:
        version = await admin.rotate(cfg, root)
    finally:
        await root.close()
    output(args, {"current": version, "next": "key servers: `skm barrier refresh`, then `skm barrier rewrap`"},
           title="system key rotated")
    return 0


def _retire(args: argparse.Namespace) -> int:
    admin.retire(load_config(args), args.version)
    print(f"retired system-key version {args.version}")
    return 0


def _status(args: argparse.Namespace) -> int:
    output(args, admin.status(load_config(args)), title="system-key server")
    return 0
