"""Several key-server replicas behind one name (`https://localhost:P`, as compose's `keyserver:8443`).

The replicas are real key servers on one data dir, each on its own loopback address and the same
port; the name resolves through a resolver the test controls (what DNS would answer). A rolling
restart moves each replica to a new address, faster than any DNS cache expires: writes through the
sidecar must keep working because a refused connection goes to the next address, then to the name
looked up afresh.
"""
from __future__ import annotations

import socket
import time

import pytest
from aiohttp.abc import AbstractResolver

import sidecar.upstream as upstream_mod
from server.app import KeyServer
from sidecar.app import Sidecar
from tests.support.postgres import free_port
from tests.support.server import make_config
from tests.support.sidecar import issue_host_cert, register_certificate, sidecar_config, unix_session


class Names(AbstractResolver):
    """What the DNS server says right now; `lookups` counts the questions."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        self.lookups += 1
        if not self.table.get(host):
            raise OSError(f"{host} does not resolve")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for a in self.table[host]]

    async def close(self) -> None:
        pass


@pytest.fixture
async def replicas(skm):
    """Start replicas of the `skm` harness's server (same data dir) on ADDRESS:port; all stopped at the end."""
    running: dict[str, KeyServer] = {}
    port = free_port()

    async def start(address: str) -> None:
        cfg = make_config(skm.tmp / "data", data={"host": address, "port": port}, mgmt={"port": 0})
        running[address] = await KeyServer(cfg).start()

    async def stop(address: str) -> None:
        await running.pop(address).stop()

    start.port, start.stop = port, stop          # type: ignore[attr-defined]
    yield start
    for server in running.values():
        await server.stop()


async def test_rolling_restart_faster_than_the_dns_cache(skm, store, replicas, tmp_path, monkeypatch):
    # Lookups only when asked for: a new address can be found only through the refused-connection path.
    monkeypatch.setattr(upstream_mod, "RESOLVE_TTL", 3600.0)
    key = (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"]
    await replicas("127.0.0.2")
    await replicas("127.0.0.3")
    names = Names({"localhost": ["127.0.0.2", "127.0.0.3"]})
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "names-host")
    await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, "names-host")
    cfg = sidecar_config(appkey=skm.appkey, urls=[f"https://localhost:{replicas.port}"], ca=skm.pki.ca_cert,
                         host=host, socket=tmp_path / "n.sock", events={"enabled": False},
                         upstream={"unhealthy_for": 30})
    sc = await Sidecar(cfg, resolver=names).start()

    async def write(s) -> None:
        async with s.post(f"/symmetric-keys/{key}/encrypt", json={"plaintext": "eA=="}) as r:
            assert r.status == 200, await r.text()

    def used() -> dict[str, bool]:
        return {t.address: t.last_ok is not None for t in sc.upstream.targets}

    try:
        async with unix_session(cfg.listen.socket) as s:
            for _ in range(4):
                await write(s)
            assert used() == {"127.0.0.2": True, "127.0.0.3": True}       # spread over both addresses

            # Rolling restart, done before any lookup expires: each replica comes back on a new address.
            lookups = names.lookups
            await replicas("127.0.0.4")
            names.table["localhost"] = ["127.0.0.4", "127.0.0.3"]
            await replicas.stop("127.0.0.2")
            await replicas("127.0.0.5")
            names.table["localhost"] = ["127.0.0.4", "127.0.0.5"]
            await replicas.stop("127.0.0.3")
            await write(s)                  # both known addresses refuse: the name is looked up again, then sent
            assert names.lookups == lookups + 1
            for _ in range(4):
                await write(s)
            assert used() == {"127.0.0.4": True, "127.0.0.5": True}
            async with s.get("/v1/status") as r:
                servers = (await r.json())["upstream"]["servers"]
            assert sorted(x["address"] for x in servers) == ["127.0.0.4", "127.0.0.5"]
            assert all(x["url"] == f"https://localhost:{replicas.port}" and x["healthy"] for x in servers)

            # One replica lost and the name not yet updated: every write goes to the survivor.
            await replicas.stop("127.0.0.4")
            for _ in range(4):
                await write(s)
            assert [t.address for t in sc.upstream.targets if t.healthy(time.monotonic())] == ["127.0.0.5"]
    finally:
        await sc.stop()


async def test_a_name_that_resolves_to_nothing_is_a_clear_503(skm, store, tmp_path):
    names = Names({})
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "nx-host")
    cfg = sidecar_config(appkey=skm.appkey, urls=["https://keyserver.invalid:8443"], ca=skm.pki.ca_cert,
                         host=host, socket=tmp_path / "x.sock", events={"enabled": False})
    sc = await Sidecar(cfg, resolver=names).start()
    try:
        async with unix_session(cfg.listen.socket) as s:
            async with s.post(f"/symmetric-keys/{'0' * 32}/encrypt", json={"plaintext": "eA=="}) as r:
                body = await r.json()
                assert r.status == 503 and not body["header"]["isSuccessful"], body
        assert names.lookups >= 1
    finally:
        await sc.stop()


async def test_an_address_that_never_answers_is_passed_over_for_writes(skm, store, replicas, tmp_path):
    """A replica whose container is gone answers nothing (no refusal): the SYN goes unanswered until the
    connect timeout. Nothing was sent, so a write moves on to the next address."""
    key = (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"]
    await replicas("127.0.0.7")
    # A listener whose accept queue is full drops new SYNs: as silent as an address nobody holds.
    silent = socket.socket()
    silent.bind(("127.0.0.6", replicas.port))
    silent.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.6", replicas.port))
        fillers.append(c)
    names = Names({"localhost": ["127.0.0.6", "127.0.0.7"]})
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "silent-host")
    await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, "silent-host")
    cfg = sidecar_config(appkey=skm.appkey, urls=[f"https://localhost:{replicas.port}"], ca=skm.pki.ca_cert,
                         host=host, socket=tmp_path / "s.sock", events={"enabled": False},
                         upstream={"unhealthy_for": 30, "connect_timeout": 0.5})
    sc = await Sidecar(cfg, resolver=names).start()
    try:
        async with unix_session(cfg.listen.socket) as s:
            for _ in range(2):                      # one of the two starts with the silent address
                async with s.post(f"/symmetric-keys/{key}/encrypt", json={"plaintext": "eA=="}) as r:
                    assert r.status == 200, await r.text()
        (gone,) = [t for t in sc.upstream.targets if t.address == "127.0.0.6"]
        assert gone.failures == 1 and gone.last_error == "cannot connect (ConnectionTimeoutError)"
    finally:
        await sc.stop()
        for c in [*fillers, silent]:
            c.close()
