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
