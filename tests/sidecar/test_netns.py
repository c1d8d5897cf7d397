"""End to end on real links: the key server in one network namespace, the sidecar in a
host namespace with a set MAC, a key store with `attested` MAC AND certificate auth.

An app on the host reads a secret through the sidecar's socket holding no
credential; the same app talking straight to the key server is refused; a
changed NIC MAC (not bound in the host certificate) is refused through the
sidecar too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from server.access.authdata import AuthData
from server.access.pki import DevPKI
from server.barrier.barrier import Barrier
from server.barrier.providers import make_provider
from server.barrier.sources import system_key_source, unseal_once
from server.events import EventBus
from server.init import init_server
from server.keys.service import KeyService
from server.storage.factory import open_storage
from tests.support.netns import Lab, require_netns
from tests.support.server import make_config
from tests.support.sidecar import issue_host_cert, register_certificate

BIN = Path(sys.executable).parent
HOST_MAC = "02:00:00:00:5c:01"
OTHER_MAC = "02:00:00:00:5c:99"


def wait_for(pred, timeout: float, what: str, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


async def prepare_server(tmp: Path, server_ip: str) -> tuple[dict, Path]:
    """Initialise the data dir in-process: key store (attested MAC + cert, AND), secret, MAC, host cert."""
    cfg = make_config(tmp / "data", data={"host": server_ip, "port": 0})
    init = await init_server(cfg, hostnames=[server_ip])
    storage = open_storage(cfg.storage_url())
    await storage.open()
    root, source = make_provider(cfg.rootkey, cfg.root_key_path()), system_key_source(cfg)
    barrier = Barrier()
    try:
        await unseal_once(barrier, source, root)
        keys = KeyService(storage, barrier)
        project = await keys.project_by_appkey(init.appkey)
        ks = await keys.create_keystore(project.id, "hosts", mac_auth=True, cert_auth=True, auth_mode="AND",
                                        mac_mode="attested", actor="test")
        key = await keys.create_key(ks, "SECRET", "db-password", secret_value="netns-secret", actor="test")
        await AuthData(storage, EventBus(), keys.ctx.seal).add(ks, "macs", HOST_MAC, actor="test")
        host = issue_host_cert(DevPKI(cfg.pki_dir()).load_ca(), tmp, "app-host", macs=[HOST_MAC])
        await register_certificate(storage, barrier, ks.id, host, "app-host")
    finally:
        await storage.close()
        await root.close()
        await source.close()
    conf = tmp / "server.toml"
    conf.write_text(f'data_dir = "{cfg.data_dir}"\nlog_format = "json"\n'
                    f'[data]\nhost = "{server_ip}"\nport = 0\n[mgmt]\nhost = "127.0.0.1"\nport = 0\n')
    return {"appkey": init.appkey, "key_id": key.id, "ca": str(DevPKI(cfg.pki_dir()).ca_cert),
            "cert": str(host.cert), "key": str(host.key)}, conf


def app_read(lab: Lab, sock: Path, key_id: str) -> subprocess.CompletedProcess:
    """The app: no certificate, no key, no appkey, no MAC; just the socket."""
    code = ("import sys\nfrom sidecar.client import SidecarClient, SidecarError\n"
            f"c = SidecarClient({str(sock)!r})\n"
            f"try:\n    print(c.get_secret({key_id!r}))\n"
            "except SidecarError as e:\n    print('refused:', e.result_message); sys.exit(3)\n")
    return lab.run("app", [str(BIN / "python"), "-c", code], env=os.environ.copy(), cwd=str(Path.cwd()))


async def test_app_reads_through_the_sidecar_and_is_refused_directly(tmp_path):
    require_netns()
    with Lab("sc", subnet=252) as lab:
        lab.add_host("app", HOST_MAC)
        info, server_conf = await prepare_server(tmp_path, lab.server_ip)

        server_log = tmp_path / "server.log"
        with open(server_log, "w") as out:
            lab.popen("server", [str(BIN / "skm"), "server", "run", "--config", str(server_conf)],
                      stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        m = wait_for(lambda: re.search(r"data plane https://([\d.]+):(\d+)", server_log.read_text()), 30,
                     "the key server", server_log)
        url = f"https://{m.group(1)}:{m.group(2)}"

        sock = tmp_path / "sidecar.sock"
        conf = tmp_path / "sidecar.toml"
        conf.write_text(
            f'appkey = "{info["appkey"]}"\nlog_format = "json"\n'
            f'[upstream]\nurls = ["{url}"]\nca = "{info["ca"]}"\ncert = "{info["cert"]}"\nkey = "{info["key"]}"\n'
            f'[listen]\nsocket = "{sock}"\n[cache]\nttl = 0.3\n[attest]\nrecheck = 0.2\n')
        sidecar_log = tmp_path / "sidecar.log"
        with open(sidecar_log, "w") as out:
            lab.popen("app", [str(BIN / "skm"), "sidecar", "--config", str(conf)], stdout=out,
                      stderr=subprocess.STDOUT, env=os.environ.copy())
        wait_for(lambda: sock.exists(), 30, "the sidecar socket", sidecar_log)

        r = app_read(lab, sock, info["key_id"])
        assert r.returncode == 0, r.stdout + r.stderr + sidecar_log.read_text()[-2000:]
        assert r.stdout.strip() == "netns-secret"

        status = json.loads(lab.run("app", ["curl", "-s", "--unix-socket", str(sock), "http://s/v1/status"]).stdout)
        assert status["attestation"]["mac"] == HOST_MAC and status["attestation"]["interface"] == "eth0"
        assert status["upstream"]["reachable"] is True and status["certificate"]["notAfter"]

        # Straight to the key server from the same host: refused, even claiming the right MAC.
        direct = lab.run("app", ["curl", "-s", "--cacert", info["ca"], "-H", f"X-TOAST-CLIENT-MAC-ADDR: {HOST_MAC}",
                                 f"{url}/keymanager/v1.0/appkey/{info['appkey']}/secrets/{info['key_id']}"])
        out = json.loads(direct.stdout)
        assert out["header"]["isSuccessful"] is False
        assert out["header"]["resultMessage"] in ("MAC Auth Failure", "Certificate Auth Failure")
        assert "netns-secret" not in direct.stdout

        # The NIC's MAC changes to one the host certificate does not bind: the sidecar attests the
        # new MAC and the key server refuses it; back to the bound MAC, it works again.
        lab.set_mac("app", OTHER_MAC)
        wait_for(lambda: app_read(lab, sock, info["key_id"]).stdout.startswith("refused: MAC Auth Failure"), 10,
                 "refusal after the MAC changed", sidecar_log)
        lab.set_mac("app", HOST_MAC)
        wait_for(lambda: app_read(lab, sock, info["key_id"]).stdout.strip() == "netns-secret", 10,
                 "recovery after the MAC came back", sidecar_log)
