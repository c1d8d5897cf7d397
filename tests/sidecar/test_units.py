"""Pieces that need no server: config, access rules, path parsing, the cache's bookkeeping, attestation."""
from __future__ import annotations

import asyncio

import pytest

from server.errors import ConfigError, URLNotFound
from sidecar.attest import read_mac
from sidecar.cache import Cache
from sidecar.local_api import parse_path
from sidecar.settings import AccessRule, load_config
from sidecar.upstream import UpstreamResponse, UpstreamUnavailable

BASE = {"appkey": "App1", "upstream": {"cert": "/c.pem", "key": "/k.pem"}}


def test_config_env_overrides_and_validation():
    cfg = load_config(None, env={"SKM_SIDECAR_APPKEY": "FromEnv", "SKM_SIDECAR_UPSTREAM_CERT": "/c",
                                 "SKM_SIDECAR_UPSTREAM_KEY": "/k", "SKM_SIDECAR_CACHE_TTL": "5",
                                 "SKM_SIDECAR_UPSTREAM_URLS": "https://a:1,https://b:2",
                                 "SKM_SIDECAR_ACCESS": f"key:{'a' * 32} uid:1 gid:2,keystore:7 uid:3"})
    assert cfg.appkey == "FromEnv" and cfg.cache.ttl == 5.0 and cfg.upstream.urls == ("https://a:1", "https://b:2")
    assert cfg.rules()[0] == AccessRule("key", "a" * 32, frozenset({1}), frozenset({2}))
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(None, env={}, overrides={**BASE, "cach": {}})
    with pytest.raises(ConfigError, match="appkey"):
        load_config(None, env={}, overrides={"upstream": BASE["upstream"]})
    with pytest.raises(ConfigError, match="https"):
        load_config(None, env={}, overrides={**BASE, "upstream": {**BASE["upstream"], "urls": ["http://x"]}})
    for bad in ("key:xyz uid:1", "keystore:abc uid:1", "key:" + "a" * 32, "host:1 uid:1", "key:" + "a" * 32 + " u:1"):
        with pytest.raises(ConfigError):
            AccessRule.parse(bad)


def test_paths_with_and_without_the_nhn_prefix():
    k = "0123456789abcdef0123456789abcdef"
    t = parse_path(f"/keymanager/v1.2/appkey/AppsKey/secrets/{k}", "v1.0")
    assert (t.version, t.suffix, t.key_id, t.keystore_id) == ("v1.2", f"/secrets/{k}", k, None)
    t = parse_path(f"/symmetric-keys/{k}/encrypt", "v1.3")
    assert (t.version, t.key_id) == ("v1.3", k)
    t = parse_path(f"/keystores/12/keys/{k}", "v1.0")
    assert (t.keystore_id, t.key_id) == (12, k)
    for bad in ("/events", "/keymanager/v1.0/appkey/A/events", "/secrets/../x", "/a//b", "/x y", "/"):
        with pytest.raises(URLNotFound):
            parse_path(bad, "v1.0")


async def test_cache_singleflight_stale_and_bounds():
    now = [0.0]
    c = Cache(ttl=10, max_entries=3, max_bytes=10_000, stale_if_error=60, clock=lambda: now[0])
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return UpstreamResponse(200, b'{"v":%d}' % calls, "application/json", "u")

    rs = await asyncio.gather(*(c.get("a", "k1", fetch) for _ in range(50)))
    assert calls == 1 and {r.body for r in rs} == {b'{"v":1}'}
    assert (await c.get("a", "k1", fetch)).source == "hit"

    async def down():
        raise UpstreamUnavailable("down")

    now[0] = 30                                   # expired, within the stale bound
    r = await c.get("a", "k1", down)
    assert r.source == "stale" and r.age == 30
    now[0] = 61                                   # past the bound: the error stands, the entry is gone
    with pytest.raises(UpstreamUnavailable):
        await c.get("a", "k1", down)
    assert len(c) == 0

    async def gone():
        return UpstreamResponse(404, b"{}", "application/json", "u")
    await c.get("b", "k2", fetch)
    now[0] = 100
    assert (await c.get("b", "k2", gone)).status == 404 and len(c) == 0   # a 4xx is never papered over

    for i in range(5):
        await c.get(f"e{i}", f"k{i}", fetch)
    assert len(c) == 3 and c.bytes == sum(len(e.body) + 256 for e in c._entries.values())

    # A drop while a fetch is in flight: the (possibly old) answer is returned but not stored.
    async def slow():
        await asyncio.sleep(0.05)
        return UpstreamResponse(200, b"old", "application/json", "u")
    task = asyncio.create_task(c.get("z", "kz", slow))
    await asyncio.sleep(0.01)
    c.drop_key("kz")
    assert (await task).body == b"old" and "z" not in c._entries
    assert (await c.get("z", "kz", fetch)).source == "miss" and "z" in c._entries     # the next fill stores

    # Events for keys this sidecar never cached (another app's store churning) leave nothing behind:
    # the bookkeeping that protects in-flight fills lasts only as long as they do.
    for i in range(10_000):
        c.drop_key(f"elsewhere-{i}")
    assert not c._gen and not c._filling


def test_attestation_reads_the_loopback_and_a_real_interface():
    assert read_mac("127.0.0.1") == ("lo", "00:00:00:00:00:00")
    with pytest.raises(OSError):
        read_mac("127.0.0.1", interface="no-such-if0")


def test_route_table_longest_prefix_then_metric_and_only_routes_that_are_up(tmp_path):
    from sidecar.attest import _route_proc
    table = tmp_path / "route"
    # Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT (little-endian hex, as the kernel)
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
                     "eth0\t00000000\t0102000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"       # default
                     "eth1\t0000000A\t00000000\t0001\t0\t0\t200\t0000FFFF\t0\t0\t0\n"       # 10.0/16 m200
                     "eth2\t0000000A\t00000000\t0001\t0\t0\t50\t0000FFFF\t0\t0\t0\n"        # 10.0/16 m50
                     "eth3\t0001000A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")        # 10.0.1/24, down
    assert _route_proc("10.0.1.5", table) == "eth2"
    assert _route_proc("192.0.2.1", table) == "eth0"
    assert _route_proc("127.0.0.1", table) == "lo"
    assert _route_proc("10.0.1.5", tmp_path / "missing") is None


def test_the_sidecar_does_not_load_the_server_runtime_or_scapy():
    """Resident memory: importing the sidecar and attesting over the kernel's files pulls in neither
    the key server's runtime/API stack (pydantic, the key service) nor scapy (~20 MB)."""
    code = ("import sys, server.cli.main, sidecar.app, sidecar.local_api\n"
            "from sidecar.attest import read_mac\n"
            "assert read_mac('127.0.0.1')[0] == 'lo'\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('scapy', 'pydantic') or m in "
            "('server.runtime', 'server.keys.service', 'server.api.middleware', 'server.api.routing')]\n"
            "assert not bad, bad\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_mac_header_matches_the_key_servers():
    from server.api.client.context import MAC_HEADER
    from sidecar.upstream import MAC_HEADER as SIDECAR_MAC_HEADER
    assert SIDECAR_MAC_HEADER == MAC_HEADER


async def test_the_allow_list_decides_without_io_exactly_as_check_does():
    """Policy.allows_now (the fast path's synchronous check) passes only where check() passes, and
    defers (False) whenever a key store's member list would have to be fetched first."""
    from server.errors import Forbidden
    from sidecar.local_api import Caller, Policy, Target
    k1, k2, k3 = "1" * 32, "2" * 32, "3" * 32

    class Upstream:
        calls = 0

        async def request(self, *_a, **_k):
            Upstream.calls += 1
            return UpstreamResponse(200, b'{"body":{"keyIdList":["%s"]}}' % k2.encode(), "application/json", "u")

    rules = [AccessRule.parse(f"key:{k1} uid:1000"), AccessRule.parse("keystore:7 gid:50")]
    for default in ("allow", "deny"):
        p = Policy(rules, default, Upstream(), "v1.0", ttl=30)
        callers = [Caller("unix", 1000, 1, 1, frozenset({1})), Caller("unix", 2000, 50, 2, frozenset({50})),
                   Caller("unix", 3000, 3, 3, frozenset({3})), Caller("tcp")]
        targets = [Target("v1.0", f"/secrets/{k}", k, None) for k in (k1, k2, k3)]
        before = Upstream.calls
        assert not p.allows_now(callers[0], targets[0])          # store 7's members are not known yet
        assert Upstream.calls == before                          # and it asked nobody
        for c in callers:
            for t in targets:
                try:
                    await p.check(c, t)
                    allowed = True
                except Forbidden:
                    allowed = False
                assert p.allows_now(c, t) is allowed, (default, c, t)
        p.forget(7)
        assert not p.allows_now(callers[0], targets[0])


def test_a_missing_host_certificate_is_named(tmp_path):
    # What `skm sidecar --check` says for the example config before its files exist: which file, and
    # which settings point at it (it said only "FileNotFoundError").
    from sidecar.upstream import load_identity
    missing = tmp_path / "host.pem"
    cfg = load_config(None, env={}, overrides={"appkey": "a" * 16, "upstream": {
        "urls": ["https://127.0.0.1:9"], "cert": str(missing), "key": str(tmp_path / "host-key.pem")}})
    with pytest.raises(ConfigError) as e:
        load_identity(cfg)
    assert f"No such file or directory: {missing}" in str(e.value) and "upstream.cert" in str(e.value)
