"""`skm backup create` as an operator runs it (stdlib http.client + ssl): the bar on a terminal, the
summary either way, and each failure one line with its exit code and nothing left behind."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import socket
import sys
import time

import pytest

from tests.support.backup import REPO
from tests.support.cli import cli_env, skm_cli


async def _on_a_terminal(env: dict, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """`skm ARGS` with stderr on a pseudo-terminal (stdout piped); (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "server.cli.main", *args, env=env, cwd=str(REPO),
                                             stdout=asyncio.subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = bytearray()
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout

    def drain() -> bool:
        try:
            data = os.read(master, 65536)
        except OSError:                   # EIO: the terminal's last writer has gone
            return False
        seen.extend(data)
        return bool(data)
    try:
        out_task = asyncio.ensure_future(p.stdout.read())
        while await loop.run_in_executor(None, drain):
            assert time.monotonic() < deadline, "timed out"
        out = await out_task
        code = await p.wait()
    finally:
        os.close(master)
    return code, out.decode(), seen.decode(errors="replace")


async def test_a_bar_on_a_terminal_none_in_a_pipe_the_same_summary(skm, tmp_path):
    store = await skm.keystore("bar")
    await skm.key(store, "SECRET", "s", secretValue="v")
    env = {**cli_env(skm), "TERM": "xterm", "COLUMNS": "100"}
    code, out, term = await _on_a_terminal(env, "backup", "create", "--out", str(tmp_path / "tty.skmbak"))
    assert code == 0, term
    assert "backing up" in term and "━" in term, term
    assert out.startswith(f"backup written: {tmp_path / 'tty.skmbak'} (")
    code, out2, err = await skm_cli(skm, "backup", "create", "--out", str(tmp_path / "pipe.skmbak"))
    assert code == 0 and err == "", err                  # piped: no bar, no escape codes in a log
    assert out2.startswith(f"backup written: {tmp_path / 'pipe.skmbak'} (") and "audit head: record" in out2
    code, out3, err = await skm_cli(skm, "backup", "create", "--out", str(tmp_path / "j.skmbak"), "--json")
    summary = json.loads(out3)
    assert code == 0 and summary["records"] > 0 and summary["bytes"] == (tmp_path / "j.skmbak").stat().st_size
    assert summary["tables"]["keys"] == 1 and summary["systemKeyVersions"] == [1]


async def test_each_failure_is_one_line_with_its_exit_code_and_no_file(skm, tmp_path):
    out = tmp_path / "never.skmbak"
    # A CA that did not sign the server's certificate.
    code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out),
                                  env={"SKM_CACERT": "/etc/ssl/certs/ca-certificates.crt"})
    assert code == 6 and "is not trusted" in err and "SKM_CACERT" in err and err.count("\n") == 1, err
    # Nobody listening.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out), env={"SKM_ADDR": f"https://127.0.0.1:{port}"})
    assert code == 6 and "cannot reach" in err and "is the server running" in err and err.count("\n") == 1, err
    # A token the server does not know; and no token at all.
    code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out), env={"SKM_TOKEN": "skm_not_a_token"})
    assert code == 3 and err.startswith("error: ") and err.count("\n") == 1, err
    code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out), env={"SKM_TOKEN": ""})
    assert code == 3 and "no operator token: set SKM_TOKEN" in err and err.count("\n") == 1, err
    # --json: the error as one JSON object.
    code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out), "--json",
                                  env={"SKM_ADDR": f"https://127.0.0.1:{port}"})
    assert code == 6 and json.loads(err)["error"]["kind"] == "connection", err
    assert not out.exists() and not (tmp_path / "never.skmbak.partial").exists()


@pytest.mark.parametrize("what", ["cut", "no-manifest-line"])
async def test_a_stream_that_ends_without_its_trailer_is_refused_and_nothing_kept(skm, tmp_path, what):
    """A server (real TLS, the installation's certificate) that starts a backup and then dies, or that
    streams something with no manifest line (more than its 4 MiB limit before a newline): the CLI refuses
    what it got, exit 6, and leaves neither the file nor its .partial."""
    from server.access.tls import server_context
    manifest = json.dumps({"format": "skm-backup", "formatVersion": 3, "backupId": "0" * 32,
                           "payload": {"kind": "sqlite-image", "bytes": 1 << 20}}).encode() + b"\n"
    body = manifest + b"\0" * 4096                       # the image begins, then the connection drops
    sent = 0

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if what == "cut":
            writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
        else:           # no newline, ever: up to 256 MiB, while the client keeps reading
            chunk = b"x" * (1 << 20)
            try:
                while sent < 256 << 20 and not writer.is_closing():     # (closing: the client went away)
                    writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    await writer.drain()
                    sent += len(chunk)
                    await asyncio.sleep(0)      # (drain may not yield: let a lost connection be seen)
            except (ConnectionError, OSError):
                pass
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(dying, "127.0.0.1", 0,
                                     ssl=server_context(skm.pki.server_cert, skm.pki.server_key))
    try:
        port = srv.sockets[0].getsockname()[1]
        out = tmp_path / "cut.skmbak"
        code, _o, err = await skm_cli(skm, "backup", "create", "--out", str(out),
                                      env={"SKM_ADDR": f"https://127.0.0.1:{port}"})
    finally:
        srv.close()
        await srv.wait_closed()
    assert code == 6 and "the backup stream ended early" in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "cut.skmbak.partial").exists()
    if what == "no-manifest-line":      # it stopped reading at the manifest line's limit, not at the end
        assert sent < 64 << 20, f"the CLI read {sent >> 20} MiB looking for a manifest line"
