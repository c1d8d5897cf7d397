"""Who may use the sidecar: the socket's mode, SO_PEERCRED allow-lists (a real other
uid via setpriv), the TCP listener's anti-SSRF header, app-sent credentials."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import aiohttp
import pytest

from sidecar.app import Sidecar
from tests.support.sidecar import RecordingUpstream, issue_host_cert, sidecar_config, unix_session

OTHER_UID, OTHER_GID, SOCKET_GID = 54321, 54321, 54300


@pytest.fixture
def shared_dir():
    """A directory other uids can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="skm-sidecar-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def curl_as(uid: int, gid: int, sock: Path, path: str) -> tuple[int, dict]:
    """curl as another uid/gid with no supplementary groups (async: the sidecar runs on this loop)."""
    if shutil.which("setpriv") is None or shutil.which("curl") is None:
        pytest.skip(reason="needs setpriv (util-linux) and curl")
    if os.geteuid() != 0:
        pytest.skip(reason="running a client as another uid needs root")
    p = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "curl", "-s", "-o", "-",
        "-w", "\n%{http_code}", "--unix-socket", str(sock), f"http://sidecar{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), 20)
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
    body, _, code = out.decode().rpartition("\n")
    return int(code or 0), (json.loads(body) if body.strip() else {})


async def test_socket_is_0660_with_the_configured_group_and_a_stale_one_is_replaced(skm, make_sidecar, shared_dir):
    sock = shared_dir / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))                       # a socket file nobody serves (a crashed sidecar)
    stale.close()
    sc = await make_sidecar(listen={"socket": str(sock), "socket_group": str(SOCKET_GID)})
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == SOCKET_GID
    async with unix_session(sock) as s, s.get("/healthz") as r:
        assert r.status == 200
    # Outside the group: the kernel refuses the connection before the sidecar sees it.
    code, _ = await curl_as(OTHER_UID, OTHER_GID, sock, "/healthz")
    assert code == 0
    # A live sidecar's socket is not taken over, and a regular file is never deleted.
    with pytest.raises(Exception, match="another process is serving"):
        await Sidecar(sc.config).start()
    plain = shared_dir / "not-a-socket"
    plain.write_text("keep me")
    cfg = sidecar_config(appkey=skm.appkey, urls=[skm.data_url], ca=skm.pki.ca_cert,
                         host=issue_host_cert(skm.pki.load_ca(), skm.tmp, "h2"), socket=plain)
    with pytest.raises(Exception, match="not a socket"):
        await Sidecar(cfg).start()
    assert plain.read_text() == "keep me"


async def test_allow_list_by_uid_and_by_key_store_gid(skm, store, make_sidecar, shared_dir):
    kid = (await skm.key(store, "SECRET", "guarded", secretValue="only-for-54321"))["keyId"]
    free = (await skm.key(store, "SECRET", "free", secretValue="anyone"))["keyId"]
    other = await skm.keystore("other", certificateAuthUse="N")
    okid = (await skm.key(other, "SECRET", "in-other", secretValue="group-only"))["keyId"]
    sock = shared_dir / "s.sock"
    await make_sidecar(listen={"socket": str(sock), "socket_group": str(SOCKET_GID)},
                       access=[f"key:{kid} uid:{OTHER_UID}", f"keystore:{other['keyStoreId']} gid:{SOCKET_GID}"])

    code, out = await curl_as(OTHER_UID, SOCKET_GID, sock, f"/secrets/{kid}")
    assert code == 200 and out["body"]["secret"] == "only-for-54321"
    code, out = await curl_as(OTHER_UID + 1, SOCKET_GID, sock, f"/secrets/{kid}")
    assert code == 403 and out["header"]["resultMessage"] == "Forbidden"
    assert "allow-list" in out["header"]["resultDetail"] and out["body"] is None
    # Root is not special to the allow-list either.
    async with unix_session(sock) as s, s.get(f"/secrets/{kid}") as r:
        assert r.status == 403
        async with s.get(f"/secrets/{free}") as r2:          # a key no rule names: default allow
            assert r2.status == 200 and (await r2.json())["body"]["secret"] == "anyone"
    # The key-store rule: members of SOCKET_GID may use every key of that store; others may not.
    code, out = await curl_as(OTHER_UID + 7, SOCKET_GID, sock, f"/secrets/{okid}")
    assert code == 200 and out["body"]["secret"] == "group-only"
    async with unix_session(sock) as s, s.get(f"/secrets/{okid}") as r:
        assert r.status == 403


async def test_tcp_listener_requires_the_anti_ssrf_header(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="tcp-ok"))["keyId"]
    sc = await make_sidecar(listen={"tcp_port": 0, "tcp_allow_default": True})
    port = sc.api.tcp_port
    assert port
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/secrets/{kid}") as r:
            out = await r.json()
            assert r.status == 403 and out["header"]["isSuccessful"] is False
            assert "X-SKM-Request" in out["header"]["resultDetail"]
        async with s.get(f"http://127.0.0.1:{port}/secrets/{kid}", headers={"X-SKM-Request": "yes"}) as r:
            assert r.status == 403
        async with s.get(f"http://127.0.0.1:{port}/secrets/{kid}", headers={"X-SKM-Request": "1"}) as r:
            assert r.status == 200 and (await r.json())["body"]["secret"] == "tcp-ok"
    # Bound to loopback only.
    with pytest.raises(OSError):
        ip = _non_loopback_ip()
        if ip is None:
            raise OSError("no other address to try")
        socket.create_connection((ip, port), timeout=1).close()


def _non_loopback_ip() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None
    finally:
        s.close()


APP_CREDENTIALS = {"X-TC-AUTHENTICATION-ID": "app-id", "X-TC-AUTHENTICATION-SECRET": "app-secret-value",
                   "X-NHN-Authorization": "Bearer app-token", "X-TOAST-CLIENT-MAC-ADDR": "de:ad:be:ef:00:01"}


async def test_app_credentials_are_stripped_and_the_upstream_sees_only_the_sidecars(skm, tmp_path):
    rec = await RecordingUpstream(skm.pki.load_ca(), tmp_path).start()
    secret_file = tmp_path / "uak-secret"
    secret_file.write_text("sidecar-own-secret")
    os.chmod(secret_file, 0o600)
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "rec-host")
    cfg = sidecar_config(appkey=skm.appkey, urls=[rec.url], ca=tmp_path / "recorder-ca.pem", host=host,
                         socket=tmp_path / "rec.sock", events={"enabled": False},
                         upstream={"user_access_key_id": "sidecar-own-id",
                                   "user_access_key_secret_file": str(secret_file)})
    sc = await Sidecar(cfg).start()
    try:
        async with unix_session(cfg.listen.socket, headers=APP_CREDENTIALS) as s:
            async with s.get(f"/keymanager/v1.2/appkey/AppsOwnAppkey/secrets/{'a' * 32}") as r:
                assert r.status == 200 and (await r.json())["body"]["secret"] == "recorded"
            async with s.get("/metrics") as r:
                metrics = await r.text()
        (req,) = rec.requests
        h = {k.lower(): v for k, v in req["headers"].items()}
        assert req["path"] == f"/keymanager/v1.2/appkey/{skm.appkey}/secrets/{'a' * 32}"   # the sidecar's appkey
        assert req["client_cert"] is True                                                  # mTLS host cert
        assert h["x-tc-authentication-id"] == "sidecar-own-id"
        assert h["x-tc-authentication-secret"] == "sidecar-own-secret"
        assert h["x-toast-client-mac-addr"] == sc.attestor.mac != APP_CREDENTIALS["X-TOAST-CLIENT-MAC-ADDR"]
        assert "x-nhn-authorization" not in h and "authorization" not in h
        assert not any(v in json.dumps(req["headers"]) for v in APP_CREDENTIALS.values())
        assert 'skm_sidecar_app_credentials_total{action="stripped",header="x-tc-authentication-secret"} 1.0' in metrics
        assert "app-secret-value" not in metrics
    finally:
        await sc.stop()
        await rec.stop()


async def test_strict_mode_refuses_app_credentials(skm, tmp_path):
    rec = await RecordingUpstream(skm.pki.load_ca(), tmp_path).start()
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "rec-host")
    cfg = sidecar_config(appkey=skm.appkey, urls=[rec.url], ca=tmp_path / "recorder-ca.pem", host=host,
                         socket=tmp_path / "rec.sock", events={"enabled": False}, reject_app_credentials=True)
    sc = await Sidecar(cfg).start()
    try:
        async with unix_session(cfg.listen.socket) as s:
            async with s.get(f"/secrets/{'b' * 32}", headers={"X-TC-AUTHENTICATION-SECRET": "x"}) as r:
                out = await r.json()
                assert r.status == 403 and out["header"]["resultMessage"] == "Forbidden"
                assert "X-TC-AUTHENTICATION-SECRET" in out["header"]["resultDetail"]
            async with s.get(f"/secrets/{'b' * 32}") as r:
                assert r.status == 200
        assert len(rec.requests) == 1            # only the clean request went upstream
        assert sc.api.credential_requests == 1
    finally:
        await sc.stop()
        await rec.stop()


async def test_forged_mac_header_is_replaced_by_the_attested_one(skm, store, make_sidecar):
    sc = await make_sidecar()
    async with unix_session(sc.config.listen.socket) as s:
        async with s.get("/confirm", headers={"X-TOAST-CLIENT-MAC-ADDR": "de:ad:be:ef:00:01"}) as r:
            body = (await r.json())["body"]
    assert body["clientMacHeader"] == sc.attestor.mac
    assert body["clientSentCertificate"] is True


async def test_paths_outside_the_client_api_are_not_forwarded(skm, make_sidecar):
    sc = await make_sidecar()
    async with unix_session(sc.config.listen.socket) as s:
        for path in ("/events", "/keymanager/v1.0/appkey/x/events", "/secrets/../../api/v1/keystores",
                     "/secrets/%2e%2e/x"):
            async with s.get(path) as r:
                assert r.status == 404, path
                assert (await r.json())["header"]["resultMessage"] == "URL NOT FOUND"
    await asyncio.sleep(0)
