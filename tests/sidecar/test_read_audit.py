"""Every local read through a sidecar ends up in the key server's audit, cache hits included: with the
server away the records wait in a sealed on-disk spool, survive a sidecar restart, and what does not
fit is reported as lost, never silently."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time
from pathlib import Path

from server.app import KeyServer
from sidecar.app import Sidecar
from tests.support.sidecar import unix_session


async def read_n(sc, kid: str, n: int) -> list[str]:
    sources = []
    async with unix_session(sc.config.listen.socket) as s:
        for _ in range(n):
            async with s.get(f"/secrets/{kid}") as r:
                assert r.status == 200, await r.text()
                sources.append(r.headers["X-SKM-Cache"])
    return sources


async def sidecar_records(skm, kid: str) -> list[dict]:
    st, out = await skm.mgmt("GET", "/audit", params={"keyId": kid, "plane": "sidecar", "limit": "1000"})
    assert st == 200, out
    return out["body"]["records"]


async def until_records(skm, kid: str, n: int, timeout: float = 10.0) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        recs = await sidecar_records(skm, kid)
        if len(recs) >= n:
            return recs
        assert time.monotonic() < end, f"{len(recs)} of {n} sidecar read records arrived"
        await asyncio.sleep(0.05)


async def restart_server(skm, port: int) -> None:
    cfg = skm.server.config
    skm.server = await KeyServer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, port=port))).start()


def exe() -> str:
    return os.readlink(f"/proc/{os.getpid()}/exe")


async def test_cache_hits_become_audit_records_with_the_callers_identity(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="s3cret-value"))["keyId"]
    sc = await make_sidecar("reader", reads={"flush_interval": 0.1})
    n = 7
    sources = await read_n(sc, kid, n + 1)
    assert sources == ["miss"] + ["hit"] * n
    recs = await until_records(skm, kid, n + 1)
    assert len(recs) == n + 1
    project = await skm.rt.keys.project_by_appkey(skm.appkey)
    hits = [r for r in recs if r["detail"]["source"] == "cache"]
    assert len(hits) == n and [r["detail"]["source"] for r in recs].count("upstream") == 1
    for r in recs:
        assert r["plane"] == "sidecar" and r["actor"] == "reader-host" and r["actorKind"] == "host"
        assert r["action"] == "secret.read" and r["result"] == "ok" and r["keyStoreId"] == store["keyStoreId"]
        assert r["change"] is False and r["projectId"] == project.id
        assert r["status"] is None and r["method"] is None
        d = r["detail"]
        assert d["uid"] == os.getuid() and d["pid"] == os.getpid() and d["exe"] == exe()
        assert d["version"] == 0 and d["host"] == "reader-host" and d["readAt"].endswith("Z")
        assert r["fingerprint"] and "s3cret-value" not in str(r)
    # The records are part of the chain like any other.
    st, out = await skm.mgmt("GET", "/audit/verify")
    assert st == 200 and out["body"]["ok"] is True


async def test_reads_while_the_server_is_away_are_spooled_sealed_and_survive_a_sidecar_restart(
        skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="value-1"))["keyId"]
    sc = await make_sidecar("offline", reads={"flush_interval": 0.1}, cache={"ttl": 300})
    assert await read_n(sc, kid, 1) == ["miss"]
    await until_records(skm, kid, 1)
    port = skm.server.data_port
    await skm.server.stop()

    assert await read_n(sc, kid, 5) == ["hit"] * 5          # the cache still answers
    spool = Path(sc.config.reads.spool_path(sc.config))
    end = time.monotonic() + 10
    while not (spool.exists() and sc.reads.spool.records == 5):
        assert time.monotonic() < end, sc.reads.status()
        await asyncio.sleep(0.05)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600
    text = spool.read_bytes()
    assert kid.encode() not in text and b"secret" not in text and str(os.getpid()).encode() not in text

    # The sidecar restarts while the server is still away: the spool is what carries the records over.
    cfg = sc.config
    await sc.stop()
    again = await Sidecar(cfg).start()
    try:
        assert again.reads.spool.records == 5
        await restart_server(skm, port)
        recs = await until_records(skm, kid, 6)
        assert len(recs) == 6
        assert [r["detail"]["source"] for r in recs] == ["upstream"] + ["cache"] * 5
        assert all(r["detail"]["pid"] == os.getpid() for r in recs)
        end = time.monotonic() + 10
        while spool.exists():
            assert time.monotonic() < end, "the spool was not removed once shipped"
            await asyncio.sleep(0.05)
    finally:
        await again.stop()


async def test_a_full_spool_drops_counts_and_reports_the_loss(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar("tiny", reads={"flush_interval": 0.1, "spool_max_records": 3}, cache={"ttl": 300})
    await read_n(sc, kid, 1)
    await until_records(skm, kid, 1)
    port = skm.server.data_port
    await skm.server.stop()
    await read_n(sc, kid, 10)
    end = time.monotonic() + 10
    while sc.reads.dropped < 7:
        assert time.monotonic() < end, sc.reads.status()
        await asyncio.sleep(0.05)
    async with unix_session(sc.config.listen.socket) as s:
        async with s.get("/metrics") as r:
            metrics = await r.text()
    assert "skm_sidecar_reads_dropped_total 7.0" in metrics
    assert "skm_sidecar_reads_spooled 3.0" in metrics

    await restart_server(skm, port)
    end = time.monotonic() + 10
    while True:
        st, out = await skm.mgmt("GET", "/audit", params={"action": "sidecar.reads-dropped", "plane": "sidecar"})
        if out["body"]["records"]:
            break
        assert time.monotonic() < end, "no loss report reached the server"
        await asyncio.sleep(0.05)
    [loss] = out["body"]["records"]
    assert loss["result"] == "error" and loss["actor"] == "tiny-host" and loss["detail"]["count"] == 7
    assert "lost 7 read record(s)" in loss["reason"] and loss["detail"]["since"] and loss["detail"]["until"]
    recs = await until_records(skm, kid, 4)
    assert len(recs) == 4                                   # the first read + the 3 the spool held
    assert sc.reads.dropped == 0


async def test_a_reader_whose_executable_path_is_not_utf8_loses_no_ones_records(skm, store, make_sidecar, tmp_path):
    """A program run from a path that is not UTF-8 (a local user chooses it) reads a secret beside an ordinary
    reader. Its path used to travel as a lone surrogate the server's JSON refuses, so the whole report was
    refused (400) and every read in it, other programs' too, was lost from the audit. Now its record names
    the path with the stray byte escaped, and the ordinary reads are recorded with it."""
    import shutil
    import subprocess

    import pytest
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip(reason="needs curl (apt-get install curl) to read from a program at a path that is not UTF-8")
    kid = (await skm.key(store, "SECRET", "odd", secretValue="v"))["keyId"]
    sc = await make_sidecar("odd-path", reads={"flush_interval": 3600})
    odd_dir = os.path.join(os.fsencode(tmp_path), b"bin-\xff")
    os.mkdir(odd_dir)
    odd_curl = os.path.join(odd_dir, b"curl")
    shutil.copy(curl, odd_curl)
    await read_n(sc, kid, 2)
    proc = await asyncio.create_subprocess_exec(
        odd_curl, b"-s", b"--unix-socket", os.fsencode(sc.config.listen.socket),
        f"http://sidecar/secrets/{kid}".encode(), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b'"secret":"v"' in out, out
    await read_n(sc, kid, 1)
    await sc.reads.tick()                               # one report holding all four reads
    recs = await until_records(skm, kid, 4)
    assert sorted(r["detail"]["exe"] for r in recs) == sorted([exe()] * 3 + [f"{tmp_path}/bin-\\xff/curl"])
    assert sc.reads.refused == 0
    st, out = await skm.mgmt("GET", "/audit/verify")
    assert st == 200 and out["body"]["ok"] is True


def test_the_executable_of_this_process_is_what_a_record_names():
    from sidecar.local_api import _executable
    assert _executable(os.getpid()) == exe() and exe().startswith("/")


async def test_a_flood_of_reads_is_summarised_with_counts_not_dropped(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "hot", secretValue="v"))["keyId"]
    # No timed shipping: the test ships by hand, so all the reads fall into one interval.
    sc = await make_sidecar("flood", reads={"flush_interval": 3600, "detail_max": 5})
    await read_n(sc, kid, 1)
    await sc.reads.tick()
    await read_n(sc, kid, 50)
    await sc.reads.tick()
    recs = await until_records(skm, kid, 2)
    cache = [r for r in recs if r["detail"]["source"] == "cache"]
    assert len(cache) == 1                              # one caller (one connection), one key, one source
    d = cache[0]["detail"]
    assert d["count"] == 50 and d["lastReadAt"] >= d["readAt"] and d["uid"] == os.getuid()


async def test_a_spool_sealed_under_another_host_key_is_reported_lost(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    spool = skm.tmp / "shared.reads-spool"
    first = await make_sidecar("first", reads={"flush_interval": 0.1, "spool": str(spool)}, cache={"ttl": 300})
    await read_n(first, kid, 1)
    await until_records(skm, kid, 1)
    port = skm.server.data_port
    await skm.server.stop()
    await read_n(first, kid, 4)
    await first.stop()
    assert first.config.reads.spool and spool.exists()
    await restart_server(skm, port)
    # The host's certificate (and key) changed: the old spool cannot be opened, and says so.
    second = await make_sidecar("second", reads={"flush_interval": 0.1, "spool": str(spool)})
    end = time.monotonic() + 10
    while True:
        st, out = await skm.mgmt("GET", "/audit", params={"action": "sidecar.reads-dropped"})
        if out["body"]["records"]:
            break
        assert time.monotonic() < end, second.reads.status()
        await asyncio.sleep(0.05)
    [loss] = out["body"]["records"]
    assert loss["detail"]["count"] == 4 and loss["detail"]["cause"] == "unreadable_spool"
    assert loss["actor"] == "second-host" and "another host key" in loss["reason"]
    assert len(await sidecar_records(skm, kid)) == 1 and not spool.exists()


def test_a_reader_seen_only_by_its_argv0_has_a_stray_byte_escaped_too(monkeypatch):
    """A sidecar that may not read another user's /proc/<pid>/exe names the reader by argv[0], which that
    user chooses: a byte that is not UTF-8 is written `\\xff` there too, as the server stores it."""
    import subprocess

    from sidecar import local_api

    proc = subprocess.Popen([b"bin-\xff/sleep", b"30"], executable="/bin/sleep")
    try:
        for _ in range(200):            # argv[0] is the child's once it has exec'd
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                if f.read().startswith(b"bin-\xff/sleep\0"):
                    break
            time.sleep(0.01)
        real_readlink = os.readlink

        def unreadable(path, *a, **kw):
            if path == f"/proc/{proc.pid}/exe":
                raise PermissionError(path)
            return real_readlink(path, *a, **kw)
        monkeypatch.setattr(local_api.os, "readlink", unreadable)
        assert local_api._executable(proc.pid) == "bin-\\xff/sleep"
    finally:
        proc.kill()
        proc.wait()
