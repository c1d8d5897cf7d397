"""`skm run` (server/cli/cmd_run.py) against a real key server and a real sidecar: values reach the
program's environment only, and `--restart-on-change` restarts it when a value rotates."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.sidecar import start_registered_sidecar

REPO = Path(__file__).resolve().parents[2]


async def until(cond, what: str, timeout: float = 10.0):
    start = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def proc_file(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def children(pid: int) -> list[int]:
    return [int(p) for p in proc_file(pid, f"task/{pid}/children").split()]


def environ(pid: int) -> dict[str, str]:
    out = {}
    for item in proc_file(pid, "environ").split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode()] = v.decode()
    return out


@pytest.fixture
async def sidecar(skm, store):
    sc = await start_registered_sidecar(skm, store["keyStoreId"], "runner")
    yield sc
    await sc.stop()


async def skm_run(tmp_path: Path, *argv: str) -> asyncio.subprocess.Process:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "SKM_LOG_LEVEL": "warning"}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "server.cli.main", "run", *argv, cwd=tmp_path,
                                                env=env, stderr=asyncio.subprocess.PIPE)


async def test_the_program_gets_the_value_in_its_environment_and_nowhere_else(skm, store, sidecar, tmp_path):
    value = f"pw-{uuid.uuid4().hex}"
    key = await skm.key(store, "SECRET", "db-password", secretValue=value)
    other = await skm.key(store, "SECRET", "api-token", secretValue="tok")
    proc = await skm_run(tmp_path, "--sidecar", sidecar.config.listen.socket,
                         "--env", "DB_PASSWORD=apps/db-password", "--env", f"API_TOKEN={other['keyId']}",
                         "--", "sleep", "300")
    try:
        # skm run execs the program: the same pid becomes `sleep 300`.
        await until(lambda: proc_file(proc.pid, "cmdline") == b"sleep\x00300\x00", "the exec")
        env = environ(proc.pid)
        assert env["DB_PASSWORD"] == value and env["API_TOKEN"] == "tok"
        assert value.encode() not in proc_file(proc.pid, "cmdline")
        # Nothing on disk: not in any file under the test's directory (key server data, sidecar, cwd), nor
        # in any file the program holds open.
        seen = [p for p in tmp_path.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        for fd in fd_dir.iterdir():
            target = Path(os.readlink(fd))
            if target.is_file() and value.encode() in target.read_bytes():
                seen.append(target)
        assert seen == []
        assert key["keyId"] not in proc_file(proc.pid, "cmdline").decode()
        # No credential reaches the program: not the appkey, not the host's certificate or private key (nor
        # their paths), not an operator token; the program's whole environment is what it was given.
        up = sidecar.config.upstream
        creds = [sidecar.config.appkey, Path(up.key).read_text().strip(), up.key, up.cert]
        blob = b"\0".join([proc_file(proc.pid, "environ"), proc_file(proc.pid, "cmdline")])
        assert [c for c in creds if c.encode() in blob] == []
        # (LC_CTYPE: Python's own C-locale coercion, PEP 538, which it passes to children by design.)
        assert set(env) - {"LC_CTYPE"} == {"PATH", "PYTHONPATH", "SKM_LOG_LEVEL", "DB_PASSWORD", "API_TOKEN"}, \
            sorted(env)
        # And no process's command line anywhere on this host carries the value.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert value.encode() not in cmdline.read_bytes(), cmdline
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass                                     # a process that ended meanwhile
    finally:
        proc.kill()
        await proc.wait()


async def test_restart_on_change_restarts_the_program_with_the_rotated_value(skm, store, sidecar, tmp_path):
    key = await skm.key(store, "SECRET", "db-password", secretValue="first")
    program = ("import os, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
               "open(f'ready-{os.getpid()}', 'w').close()\n"
               "while True: time.sleep(1)\n")
    await until(lambda: sidecar.events.state == "connected", "the event stream")
    proc = await skm_run(tmp_path, "--sidecar", sidecar.config.listen.socket, "--restart-on-change",
                         "--env", "DB_PASSWORD=apps/db-password", "--", sys.executable, "-c", program)
    try:
        first = (await until(lambda: children(proc.pid) or proc.returncode is not None, "the program"))
        assert proc.returncode is None, (await proc.stderr.read()).decode()
        first = first[0]
        await until(lambda: environ(first).get("DB_PASSWORD") == "first", "the first value")
        assert b"first" not in proc_file(first, "cmdline") and b"first" not in proc_file(proc.pid, "cmdline")

        st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "second"})
        assert st == 200
        second = (await until(lambda: [c for c in children(proc.pid) if c != first], "the restart"))[0]
        await until(lambda: environ(second).get("DB_PASSWORD") == "second", "the rotated value")
        await until(lambda: (tmp_path / f"ready-{second}").exists(), "the program's SIGTERM handler")
        assert not Path(f"/proc/{first}").exists() or b"zombie" in proc_file(first, "status")
        assert children(proc.pid) == [second]

        # skm run forwards SIGTERM and exits with the program's status (7, from its handler).
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 15)
        err = (await proc.stderr.read()).decode()
        assert rc == 7, err
        assert "DB_PASSWORD changed; restarted" in err and "second" not in err and "first" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_missing_key_or_an_absent_sidecar_is_a_one_line_error(skm, store, sidecar, tmp_path):
    proc = await skm_run(tmp_path, "--sidecar", sidecar.config.listen.socket, "--env", "X=apps/nope", "--", "true")
    rc = await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert rc == 4, err
    assert err.startswith("error: ") and "apps/nope" in err and "no key named" in err
    assert len(err.strip().splitlines()) == 1

    proc = await skm_run(tmp_path, "--sidecar", str(tmp_path / "absent.sock"), "--env", "X=apps/db", "--", "true")
    rc = await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert rc == 6 and "cannot reach the sidecar" in err and len(err.strip().splitlines()) == 1

    proc = await skm_run(tmp_path, "--env", "1X=apps/db", "--", "true")
    rc = await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert rc == 1 and "NAME=KEY" in err and "Traceback" not in err
