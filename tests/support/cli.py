"""Running the real `skm` CLI as a process against a harness (management API)."""
from __future__ import annotations

import asyncio
import os
import sys

SKM = [sys.executable, "-m", "server.cli.main"]


def cli_env(h, **extra: str) -> dict:
    return {**os.environ, "SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert),
            "SKM_CONFIG": "/nonexistent", "COLUMNS": "200", **extra}


async def skm_cli(h, *args: str, env: dict | None = None, stdin: bytes | None = None,
                  timeout: float = 120) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*SKM, *args, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE,
                                             stdin=asyncio.subprocess.PIPE if stdin is not None else None,
                                             env={**cli_env(h), **(env or {})})
    out, err = await asyncio.wait_for(p.communicate(stdin), timeout)
    return p.returncode, out.decode(), err.decode()


def walk_commands(p, path: list[str] | None = None):
    """Every (command path, parser) of the CLI's argparse tree, the root first."""
    import argparse
    path = path or []
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_commands(sub, [*path, name])


def help_in_process(cmd: list[str]) -> tuple[int, str]:
    """`skm CMD --help` through the CLI's own `main()`, in this process (a subprocess per command cost a
    second each); returns the exit code and what it printed."""
    import contextlib
    import io

    from server.cli.main import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main([*cmd, "--help"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue()
