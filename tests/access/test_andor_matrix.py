"""AND / OR over all three client checks (IPv4, MAC, certificate) on real links.

The key server runs as `skm server run` in the lab's server namespace; clients are curl processes in
host namespaces whose veths carry the MAC addresses we set, so the MAC check is the kernel's
neighbour entry of the TCP peer (`neighbor` mode), not a header anyone can type. Four hosts give
every IPv4 × MAC combination; presenting the store's registered certificate, the other store's
(same CA, registered elsewhere), or none gives the third. AND passes only when all three pass and
names the first that failed; OR fails only when all three fail. The `attested` mode (the claimed MAC bound in the presented host
certificate) is checked under AND too.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.app import KeyServer
from server.init import init_server
from tests.support.netns import Lab, require_netns
from tests.support.server import Harness, make_config
from tests.support.sidecar import issue_host_cert, register_certificate

HDR = "X-TOAST-CLIENT-MAC-ADDR"
PORT = 8443            # the server namespace is ours alone: a fixed port cannot collide
VENV = Path(sys.executable).parent
# host -> (its IPv4 is registered, its MAC is registered)
HOSTS = {"a": (True, True), "c": (True, False), "d": (False, True), "b": (False, False)}
MACS = {"a": "02:00:00:00:1a:0a", "b": "02:00:00:00:1a:0b", "c": "02:00:00:00:1a:0c", "d": "02:00:00:00:1a:0d"}
FIRST_FAILURE = ("IPv4 Auth Failure", "MAC Auth Failure", "Certificate Auth Failure")


@dataclass
class Matrix:
    lab: Lab
    appkey: str
    ca: Path
    keys: dict[str, str]                       # store name -> secret key id
    certs: dict[str, tuple[Path, Path]]        # the certificate registered to each store; "good" (see secret())

    def secret(self, host: str, store: str, cert: str | None, headers: dict | None = None) -> tuple[int, dict]:
        """`cert`: "good" is the store's own certificate, "other" the other AND/OR store's, or a store name."""
        if cert in ("good", "other"):
            cert = store if cert == "good" else {"and": "or", "or": "and"}[store]
        url = f"https://{self.lab.server_ip}:{PORT}/keymanager/v1.0/appkey/{self.appkey}/secrets/{self.keys[store]}"
        argv = ["curl", "-sS", "--max-time", "30", "--cacert", str(self.ca), "-w", "\n%{http_code}", url]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        if cert:
            argv += ["--cert", str(self.certs[cert][0]), "--key", str(self.certs[cert][1])]
        p = self.lab.run(host, argv, timeout=60)
        assert p.returncode == 0, p.stderr
        body, _, status = p.stdout.rpartition("\n")
        return int(status), json.loads(body)


async def _prepare(tmp: Path, lab: Lab) -> tuple[str, dict, dict]:
    """Data dir, stores, keys and certificates, made in-process over the loopback listeners."""
    cfg = make_config(tmp / "data")
    init = await init_server(cfg, hostnames=[lab.server_ip])
    h = Harness(await KeyServer(cfg).start(), init, tmp)
    try:
        ca = h.pki.load_ca()
        # One certificate per store (a fingerprint belongs to one store); the attested store's binds a's MAC.
        certs = {name: issue_host_cert(ca, tmp, name, macs) for name, macs in
                 (("and", None), ("or", None), ("and-attested", [MACS["a"]]))}
        keys = {}
        for name, mode, mac_mode in (("and", "AND", "neighbor"), ("or", "OR", "neighbor"),
                                     ("and-attested", "AND", "attested")):
            s = await h.keystore(name, register_loopback=False, ip4AuthUse="Y", macAuthUse="Y",
                                 macVerification=mac_mode, certificateAuthUse="Y", authMode=mode)
            assert s["authMode"] == mode and s["macVerification"] == mac_mode, s
            keys[name] = (await h.key(s, "SECRET", "db", secretValue=f"value-{name}"))["keyId"]
            for host, (ip_ok, mac_ok) in HOSTS.items():
                for kind, value, yes in (("ipv4s", lab.hosts[host].ip, ip_ok), ("macs", MACS[host], mac_ok)):
                    if yes:
                        st, out = await h.mgmt("POST", f"/keystores/{s['keyStoreId']}/auths/{kind}",
                                               json={"value": value})
                        assert st == 201, out
            await register_certificate(h.rt.storage, h.rt.barrier, s["keyStoreId"], certs[name], name)
        return init.appkey, keys, {n: (c.cert, c.key) for n, c in certs.items()}
    finally:
        await h.close()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    require_netns()
    if shutil.which("curl") is None:
        pytest.skip(reason="the L2 tests use curl as the client (apt-get install curl)")
    tmp = tmp_path_factory.mktemp("andor")
    with Lab("aom", subnet=253) as lab:
        for host in HOSTS:
            lab.add_host(host, MACS[host])
        appkey, keys, certs = asyncio.run(_prepare(tmp, lab))
        config = tmp / "server.toml"
        config.write_text(f'data_dir = "{tmp / "data"}"\nlog_format = "json"\npurge_interval = 3600.0\n'
                          f'[data]\nhost = "{lab.server_ip}"\nport = {PORT}\n[mgmt]\nhost = "127.0.0.1"\nport = 8444\n')
        with open(tmp / "server.log", "wb") as log:
            server = lab.popen("server", [str(VENV / "skm"), "server", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
            m = Matrix(lab, appkey, tmp / "data" / "pki" / "ca.pem", keys, certs)
            deadline = time.monotonic() + 30           # a process start on a loaded machine
            while True:
                p = lab.run("a", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(m.ca),
                                  f"https://{lab.server_ip}:{PORT}/healthz"])
                if p.stdout == "200":
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the key server did not come up in the lab:\n"
                                + (tmp / "server.log").read_text()[-3000:])
                time.sleep(0.2)
            yield m
        # The Lab's exit stops the server and removes every namespace (and so every veth).


CASES = [(host, cert) for host in HOSTS for cert in ("good", "other", None)]


@pytest.mark.parametrize("host,cert", CASES, ids=[f"{h}-{c or 'nocert'}" for h, c in CASES])
def test_and_needs_all_three_and_or_any_one(matrix, host, cert):
    ip_ok, mac_ok = HOSTS[host]
    passed = (ip_ok, mac_ok, cert == "good")
    for store in ("and", "or"):
        st, out = matrix.secret(host, store, cert)
        should = all(passed) if store == "and" else any(passed)
        if should:
            assert st == 200 and out["body"] == {"secret": f"value-{store}"}, (store, passed, out)
            continue
        assert st == 403 and out["body"] is None, (store, passed, out)
        # AND names the first check that failed; OR (all failed) the first of them.
        want = FIRST_FAILURE[passed.index(False)]
        assert out["header"]["resultMessage"] == want, (store, passed, out)


def test_or_takes_the_kernels_mac_not_a_typed_one(matrix):
    # b is registered for nothing: claiming a registered MAC in the header does not make OR pass.
    st, out = matrix.secret("b", "or", "other", headers={HDR: MACS["a"]})
    assert st == 403 and out["header"]["resultMessage"] == "IPv4 Auth Failure" and out["body"] is None
    # d passes OR by its MAC alone (its IPv4 is not registered, its certificate is not the store's).
    st, out = matrix.secret("d", "or", "other", headers={HDR: MACS["b"]})
    assert st == 200 and out["body"] == {"secret": "value-or"}


def test_and_with_attested_mac_needs_the_claim_bound_in_the_presented_certificate(matrix):
    ok = matrix.secret("a", "and-attested", "and-attested", headers={HDR: MACS["a"]})
    assert ok[0] == 200 and ok[1]["body"] == {"secret": "value-and-attested"}, ok
    for host, cert, claim, want in (
            ("a", "and-attested", None, "MAC Auth Failure"),            # no claim
            ("a", "and-attested", MACS["d"], "MAC Auth Failure"),       # registered, but not bound in the cert
            ("a", "and", MACS["a"], "MAC Auth Failure"),                # a certificate that binds no MAC
            ("a", None, MACS["a"], "MAC Auth Failure"),                 # no certificate at all
            ("b", "and-attested", MACS["a"], "IPv4 Auth Failure")):     # AND: the IPv4 check comes first
        st, out = matrix.secret(host, "and-attested", cert, headers={HDR: claim} if claim else None)
        assert st == 403 and out["header"]["resultMessage"] == want and out["body"] is None, (host, cert, claim, out)
