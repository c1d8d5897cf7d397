"""What `skm` imports to start: only the module of the command it runs, and for the backup commands
none of the heavy libraries they do not use (their time is measured against C tools in bench/)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys

from tests.support.backup import REPO
from tests.support.cli import cli_env, walk_commands


def _tree(p: argparse.ArgumentParser) -> dict:
    """Every command path with its options and positionals, as `--help` would show them."""
    return {" ".join(path): sorted(tuple(a.option_strings) or (a.dest,) for a in sub._actions)
            for path, sub in walk_commands(p)}


def test_a_command_parses_alike_with_only_its_module():
    from server.cli.main import build_parser
    full = build_parser()
    names = [name for name in next(a for a in full._actions if isinstance(a, argparse._SubParsersAction)).choices]
    assert "backup" in names and "key" in names
    whole = _tree(full)
    def subtree(tree: dict, name: str) -> dict:
        return {path: opts for path, opts in tree.items() if path == name or path.startswith(name + " ")}
    for name in names:
        assert subtree(_tree(build_parser([name])), name) == subtree(whole, name), name


HEAVY = {"aiohttp", "structlog", "rich", "cryptography", "asyncio", "asyncpg", "pkcs11", "pydantic"}


def _program(argv: list[str]) -> str:
    return ("import sys\nfrom server.cli.main import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('\\n' + __import__('json').dumps([rc, sorted({m.split('.')[0] for m in sys.modules})]), "
            "file=sys.stderr)") % (argv,)


def _loaded(stderr: str) -> tuple[int, set[str]]:
    rc, mods = json.loads(stderr.strip().splitlines()[-1])
    return rc, set(mods)


def _imported(*argv: str) -> tuple[int, set[str]]:
    """(exit code, the top-level packages loaded) of `skm ARGV` run in a fresh interpreter."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKM_")}
    p = subprocess.run([sys.executable, "-c", _program(list(argv))], env={**base, "PYTHONPATH": str(REPO)},
                       cwd=str(REPO), capture_output=True, text=True, timeout=60)
    return _loaded(p.stderr)


def test_the_backup_commands_start_without_heavy_imports():
    for argv in (["backup", "create", "--help"], ["backup", "restore", "--help"], ["backup", "--help"]):
        rc, mods = _imported(*argv)
        assert rc == 0 and not HEAVY & mods, (argv, HEAVY & mods)


async def test_a_backup_streams_without_them(skm, tmp_path):
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _program(["backup", "create", "--out", str(tmp_path / "b.skmbak")]),
        env={**cli_env(skm), "PYTHONPATH": str(REPO)}, cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(p.communicate(), 60)
    rc, mods = _loaded(err.decode())
    assert rc == 0 and (tmp_path / "b.skmbak").stat().st_size > 0
    assert not HEAVY & mods and "http" in mods, HEAVY & mods


async def test_a_restore_runs_without_the_server_side_libraries(tmp_path):
    """An offline restore unseals, checks and installs a backup with what that needs (asyncio, the
    barrier's cryptography); the request middleware, aiohttp, pydantic and structlog stay unloaded."""
    from tests.support.backup import make_installation, run_skm
    inst = await make_installation(tmp_path / "site")
    h = await inst.start()
    try:
        store = await h.keystore("restore-imports")
        await h.key(store, "SECRET", "s", secretValue="kept")
        out = tmp_path / "b.skmbak"
        code, _o, err = await run_skm("backup", "create", "--out", str(out), env=inst.env(h))
        assert code == 0, err
    finally:
        await h.close()
    argv = ["backup", "restore", str(out), "--config", str(inst.config_path), "--data-dir", str(tmp_path / "new")]
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", _program(argv), env=inst.env(), cwd=str(REPO),
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(p.communicate(), 120)
    rc, mods = _loaded(err.decode())
    assert rc == 0 and (tmp_path / "new" / "skm.db").exists(), err.decode()[-2000:]
    assert not {"aiohttp", "pydantic", "structlog", "rich"} & mods, {"aiohttp", "pydantic", "structlog", "rich"} & mods
