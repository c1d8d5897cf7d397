"""`skm rootkey generate|rotate`: create a root key; re-wrap the system keys under another one.

Root-key rotation touches only the wrapped keyring (the local keyring file of the
key server, or the system-key server's state dir): every system-key version is
unwrapped by the old root key and wrapped by the new one, and the result is
checked to open under the new root key before it replaces anything. User data
is sealed by the system keys, which do not change, so the database is untouched.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from server.cli.common import output
from server.config import load
from server.errors import ConfigError
from server.settings import ServerConfig


def register(sub) -> None:
    p = sub.add_parser("rootkey", help="create and rotate the root key",
                       description="The root key (a 0600 file or an AES-256 key inside a PKCS#11 token) wraps "
                                   "the system keys; it never leaves the key-server host.")
    s = p.add_subparsers(dest="rootkey_command", metavar="SUBCOMMAND")
    s.required = True

    gen = s.add_parser("generate", help="create the root key named by a key-server config",
                       description="pkcs11: create a non-extractable, sensitive AES-256 key in the token "
                                   "(PIN from rootkey.pin_env or rootkey.pin_file). file: create a new 32-byte "
                                   "0600 key file. Refuses to replace an existing key.")
    gen.add_argument("--config", "-c", help="key-server TOML config (its [rootkey] section)")
    gen.add_argument("--data-dir", help="key-server data dir (for the default root key path)")
    gen.set_defaults(func=_generate)

    rot = s.add_parser("rotate", help="re-wrap the system keys under a new root key",
                       description="Unwrap every system-key version with the root key of --from-config and wrap "
                                   "it with the root key of --to-config (file to file, file to PKCS#11, ...). "
                                   "The keyring is the key server's local keyring file, or with "
                                   "--systemkey-config the system-key server's state. User data is untouched.")
    rot.add_argument("--from-config", required=True, help="key-server TOML config naming the current root key")
    rot.add_argument("--to-config", required=True, help="key-server TOML config naming the new root key")
    rot.add_argument("--systemkey-config", help="system-key server TOML config: rotate its keyring instead of "
                                                "the local keyring file")
    rot.add_argument("--systemkey-data-dir", help="system-key server state dir (instead of its config)")
    rot.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rot.set_defaults(func=_rotate)


def _server_config(path: str | None, data_dir: str | None = None) -> ServerConfig:
    return load(ServerConfig, path, overrides={"data_dir": data_dir} if data_dir else None)


def describe(cfg: ServerConfig) -> str:
    rk = cfg.rootkey
    if rk.provider == "pkcs11":
        return f"pkcs11 token {rk.token_label!r} key {rk.key_label!r}"
    return f"file {cfg.root_key_path()}"


async def _generate(args: argparse.Namespace) -> int:
    cfg = _server_config(args.config, args.data_dir)
    if cfg.rootkey.provider == "pkcs11":
        from server.barrier.pkcs11 import generate_root_key
        await generate_root_key(cfg.rootkey)
    elif cfg.rootkey.provider == "file":
        from server.barrier.rootkey import FileRootKey
        path = cfg.root_key_path()
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to replace a root key")
        await asyncio.to_thread(FileRootKey.create, path)
    else:
        raise ConfigError(f"rootkey.provider must be 'file' or 'pkcs11', not {cfg.rootkey.provider!r}")
    print(f"root key created: {describe(cfg)}")
    return 0


async def rotate_root_key(old_cfg: ServerConfig, new_cfg: ServerConfig, systemkey_cfg=None) -> dict:
    """Re-wrap the keyring from old_cfg's root key to new_cfg's; returns what was done (no key material)."""
    from server.barrier import keyring as kr
    from server.barrier.providers import make_provider
    if old_cfg.rootkey == new_cfg.rootkey and old_cfg.root_key_path() == new_cfg.root_key_path():
        raise ConfigError("--from-config and --to-config name the same root key")
    old = await asyncio.to_thread(make_provider, old_cfg.rootkey, old_cfg.root_key_path())
    try:
        new = await asyncio.to_thread(make_provider, new_cfg.rootkey, new_cfg.root_key_path())
    except BaseException:
        await old.close()
        raise
    try:
        if systemkey_cfg is not None:
            from server.systemkey import admin
            await admin.rotate_root(systemkey_cfg, old, new)
            where = str(systemkey_cfg.keyring_path())
            ring = await asyncio.to_thread(kr.load_keyring_file, systemkey_cfg.keyring_path())
        else:
            if old_cfg.systemkey.source != "local":
                raise ConfigError("this key server fetches its keyring from a system-key server; rotate the root "
                                  "key there with --systemkey-config (on the system-key host)")
            src, dst = old_cfg.system_key_path(), new_cfg.system_key_path()
            ring = await asyncio.to_thread(kr.load_keyring_file, src)
            out = await kr.rewrap(ring, old, new)
            # Prove the new keyring opens under the new root key before it replaces the old one.
            if await out.unwrap_all(new) != await ring.unwrap_all(old):
                raise ConfigError("the re-wrapped keyring does not open to the same system keys; nothing changed")
            await asyncio.to_thread(kr.save_keyring_file, dst, out)
            where, ring = str(dst), out
    finally:
        await old.close()
        await new.close()
    return {"keyring": where, "from": describe(old_cfg), "to": describe(new_cfg), "versions": sorted(ring.versions),
            "current": ring.current}


async def _rotate(args: argparse.Namespace) -> int:
    old_cfg = _server_config(args.from_config)
    new_cfg = _server_config(args.to_config)
    sk = None
    if args.systemkey_config or args.systemkey_data_dir:
        from server.systemkey.settings import load as load_sk
        sk = load_sk(args.systemkey_config, **({"data_dir": args.systemkey_data_dir} if args.systemkey_data_dir
                                              else {}))
    result = await rotate_root_key(old_cfg, new_cfg, sk)
    output(args, result, title="root key rotated")
    if not args.json:
        print(f"Start the key server with {Path(args.to_config).name}; then destroy the old root key "
              f"({result['from']}).")
    return 0
