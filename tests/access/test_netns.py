"""Access control on real links: the key server runs as `skm server run` inside the lab's server
namespace; clients are curl processes in host namespaces whose veths carry the MAC addresses we set.

Proves: IPv4 single addresses and a CIDR block's first/last address in and out; X-Forwarded-For
ignored from an untrusted peer; MAC `header` mode spoofable (documented weak), `neighbor` mode
bound to the kernel's ARP entry of the peer (a spoofed header does not help), `attested` mode bound
to the host certificate; the neighbour lookup's own ARP refresh and its off-segment reasons.
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

from server.access.pki import cert_pem, key_pem, write_pem
from server.app import KeyServer
from server.init import init_server
from tests.support.netns import Lab, require_netns
from tests.support.server import Harness, make_config

MAC_A, MAC_B = "02:00:00:00:0a:0a", "02:00:00:00:0b:0b"
HDR = "X-TOAST-CLIENT-MAC-ADDR"
PORT = 8443            # the server namespace is ours alone: a fixed port cannot collide
VENV = Path(sys.executable).parent


@dataclass
class LabServer:
    lab: Lab
    tmp: Path
    appkey: str
    ca: Path
    keys: dict[str, str]              # store name -> secret key id
    certs: dict[str, tuple[Path, Path]]

    def curl(self, host: str, path: str, *, headers: dict | None = None, cert: str | None = None,
             version: str = "v1.0") -> tuple[int, dict]:
        url = f"https://{self.lab.server_ip}:{PORT}/keymanager/{version}/appkey/{self.appkey}{path}"
        argv = ["curl", "-sS", "--max-time", "15", "--cacert", str(self.ca), "-w", "\n%{http_code}", url]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        if cert:
            argv += ["--cert", str(self.certs[cert][0]), "--key", str(self.certs[cert][1])]
        p = self.lab.run(host, argv)
        assert p.returncode == 0, p.stderr
        body, _, status = p.stdout.rpartition("\n")
        return int(status), json.loads(body)

    def secret(self, host: str, store: str, **kw) -> tuple[int, dict]:
        return self.curl(host, f"/secrets/{self.keys[store]}", **kw)


async def _prepare(tmp: Path, server_ip: str, net: str, lab: Lab) -> tuple[str, dict, dict]:
    """Data dir, stores, keys and host certificates, made in-process over the loopback listeners."""
    cfg = make_config(tmp / "data")
    init = await init_server(cfg, hostnames=[server_ip])
    h = Harness(await KeyServer(cfg).start(), init, tmp)
    try:
        async def store(name: str, **fields) -> str:
            s = await h.keystore(name, register_loopback=False, **fields)
            return s, (await h.key(s, "SECRET", "db", secretValue=f"value-{name}"))["keyId"]

        async def add(s, kind, value):
            st, out = await h.mgmt("POST", f"/keystores/{s['keyStoreId']}/auths/{kind}", json={"value": value})
            assert st == 201, out

        keys = {}
        s, keys["ip"] = await store("ip")
        await add(s, "ipv4s", lab.hosts["a"].ip)
        await add(s, "ipv4s", f"{net}.16/28")                 # .16 .. .31
        for mode in ("header", "attested", "neighbor"):
            s, keys[mode] = await store(mode, ip4AuthUse="N", macAuthUse="Y", macVerification=mode)
            await add(s, "macs", MAC_A)
        ca = h.pki.load_ca()
        certs = {}
        for name, mac in (("host-a", MAC_A), ("host-b", MAC_B)):
            cert, key = ca.issue_host(name, [mac])
            cp, kp = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
            write_pem(cp, cert_pem(cert), private=False)
            write_pem(kp, key_pem(key), private=True)
            certs[name] = (cp, kp)
        return init.appkey, keys, certs
    finally:
        await h.close()


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    require_netns()
    if shutil.which("curl") is None:
        pytest.skip(reason="the L2 tests use curl as the client (apt-get install curl)")
    tmp = tmp_path_factory.mktemp("lab")
    with Lab("acc", subnet=252) as lab:
        lab.add_host("a", MAC_A)
        lab.add_host("b", MAC_B)
        for n in (15, 16, 31, 32):
            lab.add_host(f"c{n}", f"02:00:00:00:0c:{n:02x}", ip_last=n)
        appkey, keys, certs = asyncio.run(_prepare(tmp, lab.server_ip, lab.net, lab))
        config = tmp / "server.toml"
        config.write_text(f'data_dir = "{tmp / "data"}"\nlog_format = "json"\npurge_interval = 3600.0\n'
                          f'[data]\nhost = "{lab.server_ip}"\nport = {PORT}\n[mgmt]\nhost = "127.0.0.1"\nport = 8444\n')
        log = open(tmp / "server.log", "wb")
        server = lab.popen("server", [str(VENV / "skm"), "server", "run", "--config", str(config)],
                           stdout=log, stderr=subprocess.STDOUT)
        ls = LabServer(lab, tmp, appkey, tmp / "data" / "pki" / "ca.pem", keys, certs)
        deadline = time.monotonic() + 30
        while True:
            p = lab.run("a", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ls.ca),
                              f"https://{lab.server_ip}:{PORT}/healthz"])
            if p.stdout == "200":
                break
            if server.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail("the key server did not come up in the lab:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        try:
            yield ls
        finally:
            log.close()


def ok(res, value: str) -> None:
    st, out = res
    assert st == 200, out
    assert out["body"] == {"secret": value}


def denied(res, message: str) -> dict:
    st, out = res
    assert st == 403, out
    assert out["header"]["resultMessage"] == message and out["body"] is None
    return out


def test_ipv4_addresses_and_cidr_boundaries(lab_server):
    ls = lab_server
    st, out = ls.curl("a", "/confirm")
    assert out["body"]["clientIp"] == ls.lab.hosts["a"].ip
    ok(ls.secret("a", "ip"), "value-ip")                      # single address
    denied(ls.secret("b", "ip"), "IPv4 Auth Failure")
    ok(ls.secret("c16", "ip"), "value-ip")                    # first address of .16/28
    ok(ls.secret("c31", "ip"), "value-ip")                    # last address
    denied(ls.secret("c15", "ip"), "IPv4 Auth Failure")       # one below
    denied(ls.secret("c32", "ip"), "IPv4 Auth Failure")       # one above
    # An untrusted peer's X-Forwarded-For is ignored.
    out = denied(ls.secret("b", "ip", headers={"X-Forwarded-For": ls.lab.hosts["a"].ip}), "IPv4 Auth Failure")
    assert ls.curl("b", "/confirm", headers={"X-Forwarded-For": ls.lab.hosts["a"].ip})[1]["body"]["clientIp"] == \
        ls.lab.hosts["b"].ip
    # The denial says nothing about what is registered: b and c32 get the very same body.
    assert out == denied(ls.secret("c32", "ip"), "IPv4 Auth Failure")


def test_header_mode_is_spoofable(lab_server):
    ls = lab_server
    ok(ls.secret("a", "header", headers={HDR: MAC_A}), "value-header")
    denied(ls.secret("b", "header", headers={HDR: MAC_B}), "MAC Auth Failure")
    # NHN-compatible and weak: host B typing host A's MAC passes.
    ok(ls.secret("b", "header", headers={HDR: MAC_A.upper()}), "value-header")


def test_neighbor_mode_uses_the_kernel_neighbour_entry(lab_server):
    ls = lab_server
    ok(ls.secret("a", "neighbor"), "value-neighbor")                              # no header needed
    ok(ls.secret("a", "neighbor", headers={HDR: MAC_B}), "value-neighbor")        # a header is ignored
    spoof = denied(ls.secret("b", "neighbor", headers={HDR: MAC_A}), "MAC Auth Failure")
    plain = denied(ls.secret("b", "neighbor"), "MAC Auth Failure")
    assert spoof == plain and MAC_A not in json.dumps(spoof) and MAC_A.replace(":", "") not in json.dumps(spoof)


def test_attested_mode_needs_the_host_certificate(lab_server):
    ls = lab_server
    ok(ls.secret("a", "attested", headers={HDR: MAC_A}, cert="host-a"), "value-attested")
    denied(ls.secret("b", "attested", headers={HDR: MAC_A}), "MAC Auth Failure")                  # no cert
    denied(ls.secret("b", "attested", headers={HDR: MAC_A}, cert="host-b"), "MAC Auth Failure")   # B's cert
    denied(ls.secret("b", "attested", headers={HDR: MAC_B}, cert="host-b"), "MAC Auth Failure")   # not registered


LOOKUP = """
import asyncio, json, sys
from server.access.neighbor import lookup
out = {}
async def main():
    for ip in sys.argv[1:]:
        n = await lookup(ip)
        out[ip] = [n.mac, n.reason]
asyncio.run(main())
print(json.dumps(out))
"""


def test_neighbor_lookup_refreshes_with_one_arp_request(lab_server):
    ls = lab_server
    lab = ls.lab
    a_ip, b_ip = lab.hosts["a"].ip, lab.hosts["b"].ip
    absent = f"{lab.net}.200"
    lab.exec_server("ip", "neigh", "flush", "all")
    # A route through host B makes 198.51.100.0/24 reachable only via a router.
    lab.exec_server("ip", "route", "add", "198.51.100.0/24", "via", b_ip)
    assert a_ip not in lab.exec_server("cat", "/proc/net/arp").stdout
    p = lab.run("server", [sys.executable, "-c", LOOKUP, a_ip, absent, "198.51.100.7", "192.0.2.9", "127.0.0.1"])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got[a_ip] == [MAC_A, None]                                   # found by the ARP refresh
    assert got[absent][0] is None and "did not answer" in got[absent][1]
    assert got["198.51.100.7"][0] is None and "router" in got["198.51.100.7"][1]
    assert got["192.0.2.9"][0] is None and "no route" in got["192.0.2.9"][1]
    assert got["127.0.0.1"][0] is None and "loopback" in got["127.0.0.1"][1]
