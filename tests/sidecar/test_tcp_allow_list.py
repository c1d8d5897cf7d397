"""The 127.0.0.1 listener applies the uid allow-list: each TCP caller's uid comes from the kernel's
socket table (sidecar/peer.py). Real other uids (setpriv) connect with curl over TCP."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket

import pytest

from sidecar.app import Sidecar
from sidecar.peer import tcp_peer_uid
from server.errors import ConfigError
from tests.support.sidecar import issue_host_cert, sidecar_config

ALLOWED_UID, OTHER_UID, GID = 54331, 54332, 54330


async def curl_tcp_as(uid: int, port: int, path: str) -> tuple[int, dict]:
    """curl over TCP as another uid (async: the sidecar runs on this loop)."""
    if shutil.which("setpriv") is None or shutil.which("curl") is None:
        pytest.skip(reason="needs setpriv (util-linux) and curl")
    if os.geteuid() != 0:
        pytest.skip(reason="running a client as another uid needs root")
    p = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={GID}", "--clear-groups", "curl", "-s", "-o", "-",
        "-w", "\n%{http_code}", "-H", "X-SKM-Request: 1", f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), 30)
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
    body, _, code = out.decode().rpartition("\n")
    return int(code or 0), (json.loads(body) if body.strip() else {})


def test_the_socket_table_names_the_owner_of_the_peer_end():
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as srv:
            srv.bind((host, 0))
            srv.listen()
            with socket.create_connection(srv.getsockname()[:2]) as cli:
                conn, _ = srv.accept()
                with conn:
                    assert tcp_peer_uid(family, conn.getpeername(), conn.getsockname()) == os.getuid()
                    # The server's own end is not the caller's: swapping the ends finds the accepted socket,
                    # and an address nobody uses finds nothing.
                    assert tcp_peer_uid(family, cli.getpeername(), cli.getsockname()) == os.getuid()
                    assert tcp_peer_uid(family, (host, 1), conn.getsockname()) is None


@pytest.mark.parametrize("fast_path", [True, False])
async def test_tcp_callers_get_only_what_their_uid_is_allowed(skm, store, make_sidecar, fast_path):
    kid = (await skm.key(store, "SECRET", "guarded", secretValue="tcp-only-for-54331"))["keyId"]
    unnamed = (await skm.key(store, "SECRET", "unnamed", secretValue="named-by-no-rule"))["keyId"]
    sc = await make_sidecar(listen={"tcp_port": 0, "fast_path": fast_path}, access_default="deny",
                            access=[f"key:{kid} uid:{ALLOWED_UID}"])
    port = sc.api.tcp_port
    for _ in range(2):                                  # a miss, then a cache hit: both go through the check
        code, out = await curl_tcp_as(ALLOWED_UID, port, f"/secrets/{kid}")
        assert code == 200 and out["body"]["secret"] == "tcp-only-for-54331", out
    code, out = await curl_tcp_as(OTHER_UID, port, f"/secrets/{kid}")
    assert code == 403 and out["header"]["resultMessage"] == "Forbidden" and out["body"] is None, out
    assert "allow-list" in out["header"]["resultDetail"]
    # access_default = "deny": a key no rule names is refused to everyone, the allowed uid included.
    code, out = await curl_tcp_as(ALLOWED_UID, port, f"/secrets/{unnamed}")
    assert code == 403 and out["body"] is None, out


async def test_a_tcp_listener_with_default_allow_starts_only_when_the_operator_says_so(skm):
    host = issue_host_cert(skm.pki.load_ca(), skm.tmp, "tcp-default-host")
    base = dict(appkey=skm.appkey, urls=[skm.data_url], ca=skm.pki.ca_cert, host=host,
                socket=skm.tmp / "tcp-default.sock")
    with pytest.raises(ConfigError, match="tcp_allow_default"):
        await Sidecar(sidecar_config(**base, listen={"tcp_port": 0})).start()
    assert not (skm.tmp / "tcp-default.sock").exists()          # refused before it listened
    # Deny by default (with rules), or the operator's explicit yes: it starts.
    for extra in ({"access_default": "deny", "listen": {"tcp_port": 0}},
                  {"listen": {"tcp_port": 0, "tcp_allow_default": True}}):
        sc = await Sidecar(sidecar_config(**base, **extra)).start()
        try:
            assert sc.api.tcp_port
        finally:
            await sc.stop()
