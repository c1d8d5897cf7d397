"""The `skm` CLI as a user runs it: a real process against a real server."""
from __future__ import annotations

import asyncio
import json
import os
import sys

SKM = [sys.executable, "-m", "server.cli.main"]


async def skm_cli(h, *args: str, stdin: str | None = None, env: dict | None = None) -> tuple[int, str, str]:
    e = {**os.environ, "SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert),
         "SKM_CONFIG": "/nonexistent", "COLUMNS": "200", **(env or {})}
    p = await asyncio.create_subprocess_exec(*SKM, *args, stdin=asyncio.subprocess.PIPE,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=e)
    out, err = await p.communicate(stdin.encode() if stdin is not None else None)
    return p.returncode, out.decode(), err.decode()


async def test_keystore_and_key_lifecycle_through_the_cli(skm):
    code, out, err = await skm_cli(skm, "keystore", "create", "cli-store", "--ip", "--json")
    assert code == 0, err
    ks = json.loads(out)["keyStoreId"]
    code, out, err = await skm_cli(skm, "keystore", "list")
    assert code == 0 and "cli-store" in out
    code, out, err = await skm_cli(skm, "key", "create", str(ks), "pw", "--type", "SECRET", "--json",
                                   stdin="from-stdin\n")
    assert code == 0, err
    key = json.loads(out)
    assert "from-stdin" not in out
    rt = skm.rt
    assert await rt.keys.secret_value(await rt.keys.key(key["keyId"])) == "from-stdin"
    code, out, err = await skm_cli(skm, "key", "create", str(ks), "aes", "--type", "SYMMETRIC_KEY", "--json")
    aes = json.loads(out)["keyId"]
    code, out, _ = await skm_cli(skm, "key", "rotate", aes, "--json")
    assert code == 0 and json.loads(out)["currentKeyValueVersion"] == 1
    code, out, _ = await skm_cli(skm, "key", "list", str(ks), "--json")
    assert {k["name"] for k in json.loads(out)["keyList"]} == {"pw", "aes"}
    code, out, _ = await skm_cli(skm, "key", "delete", aes)
    assert code == 0
    code, out, _ = await skm_cli(skm, "key", "cancel-delete", aes, "--json")
    assert json.loads(out)["keyStatus"] == "ACTIVE"
    # Exit codes scripts can use.
    code, _, err = await skm_cli(skm, "key", "delete", aes, "--now", "--yes")
    assert code == 5 and "schedule the key for deletion first" in err
    code, _, err = await skm_cli(skm, "key", "show", "0" * 32)
    assert code == 4
    code, _, err = await skm_cli(skm, "keystore", "list", env={"SKM_TOKEN": "skm_bad_token"})
    assert code == 3 and "not valid" in err


def test_every_command_has_help():
    """Every command answers --help with its usage: the whole tree in-process through `main()`, and the
    installed entry point as a real process for the root and one leaf."""
    import subprocess

    from server.cli.main import build_parser
    from tests.support.cli import help_in_process, walk_commands
    commands = [path for path, _ in walk_commands(build_parser())]
    assert len(commands) > 10
    for cmd in commands:
        code, out = help_in_process(cmd)
        assert code == 0 and out.startswith("usage: skm"), (cmd, out[:200])
    for cmd in ([], ["key", "create"]):
        r = subprocess.run([*SKM, *cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage: skm" in r.stdout, (cmd, r.stderr)


def test_demo_once_passes():
    import subprocess
    r = subprocess.run([*SKM, "demo", "--once"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed" in r.stdout and "✗" not in r.stdout
