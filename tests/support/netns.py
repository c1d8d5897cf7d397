"""Real L2 test networks made of network namespaces (root required).

`Lab` creates a server namespace with a bridge and any number of host
namespaces, each joined to the bridge by a veth pair whose host end has a MAC
address we choose. Addresses exist only inside the namespaces; nothing touches
the root namespace, and everything is removed on exit, even after a failure.

    with Lab("t1") as lab:
        lab.add_host("a", "02:00:00:00:00:0a")       # 10.251.x.10
        p = lab.popen("a", ["curl", ...])            # runs inside namespace a
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

import pytest


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="network namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip(reason="network namespace tests need iproute2 (apt-get install iproute2)")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class Host:
    ns: str
    ip: str
    mac: str
    ifname: str


@dataclass
class Lab:
    tag: str
    subnet: int = 251                 # 10.<subnet>.<n>.0/24, distinct per lab
    server_ip: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        u = uuid.uuid4().hex[:6]
        self.server_ns = f"skm-{self.tag}-s-{u}"
        self._uid = u
        self.net = f"10.{self.subnet}.{int(u[:2], 16) % 250 + 1}"
        self.server_ip = f"{self.net}.1"
        self._made: list[str] = []

    def __enter__(self) -> "Lab":
        require_netns()
        sh("ip", "netns", "add", self.server_ns)
        self._made.append(self.server_ns)
        self.exec_server("ip", "link", "set", "lo", "up")
        self.exec_server("ip", "link", "add", "br0", "type", "bridge")
        self.exec_server("ip", "addr", "add", f"{self.server_ip}/24", "dev", "br0")
        self.exec_server("ip", "link", "set", "br0", "up")
        self.exec_server("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        return self

    def exec_server(self, *argv: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.server_ns, *argv)

    def add_host(self, name: str, mac: str, ip_last: int | None = None) -> Host:
        ns = f"skm-{self.tag}-{name}-{self._uid}"
        sh("ip", "netns", "add", ns)
        self._made.append(ns)
        n = ip_last or (10 + len(self.hosts))
        ip = f"{self.net}.{n}"
        port = f"p{name[:6]}{self._uid[:4]}"
        sh("ip", "link", "add", "eth0", "netns", ns, "address", mac, "type", "veth",
           "peer", "name", port, "netns", self.server_ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self.exec_server("ip", "link", "set", port, "master", "br0")
        self.exec_server("ip", "link", "set", port, "up")
        host = self.hosts[name] = Host(ns, ip, mac, "eth0")
        return host

    def set_mac(self, name: str, mac: str) -> None:
        h = self.hosts[name]
        sh("ip", "-n", h.ns, "link", "set", h.ifname, "address", mac)
        h.mac = mac

    def popen(self, where: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process inside a host namespace (or "server"); it is killed on exit."""
        ns = self.server_ns if where == "server" else self.hosts[where].ns
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, where: str, argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        ns = self.server_ns if where == "server" else self.hosts[where].ns
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, **kw)

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in reversed(self._made):
            # Any process left in the namespace keeps it alive: kill them first.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
