"""`[[render]]` blocks: a real key server and a real sidecar render files that unmodified programs read,
keep them current on push events, and tell the reader (sidecar/render.py)."""
from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.loopback import serve
from tests.support.sidecar import start_registered_sidecar, unix_session


async def until(cond, what: str, timeout: float = 5.0) -> float:
    """Wait for `cond()` with a deadline; returns how long it took."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def read(p: Path) -> str | None:
    try:
        return p.read_text()
    except FileNotFoundError:
        return None


def metric(sc, name: str, **labels) -> float:
    total = 0.0
    for m in sc.metrics.registry.collect():
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture
async def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
async def sidecars(skm, store):
    made = []

    async def make(*blocks: dict, name: str = "renderer", **overrides):
        sc = await start_registered_sidecar(skm, store["keyStoreId"], name, render=list(blocks), **overrides)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        await sc.stop()


# The traps go in before the pidfile: a HUP that found the pid before its trap would kill the shell.
READER = r'''
trap 'echo "reloaded: $(cat "$CONF")" >> "$SEEN"' HUP
trap 'exit 0' TERM
echo $$ > "$PIDFILE"
while :; do sleep 5 & wait $!; done
'''


async def test_a_program_reads_the_rendered_file_and_is_signalled_once_per_rotation(skm, store, sidecars, run_dir):
    key = await skm.key(store, "SECRET", "db-password", secretValue="first-pass")
    dest, pidfile, seen = run_dir / "db.conf", run_dir / "reader.pid", run_dir / "seen.log"
    sc = await sidecars({"name": "db", "template": "password={{ secret('apps/db-password') }}\n",
                         "destination": str(dest), "reload_signal": "HUP", "reload_pidfile": str(pidfile)})
    # Rendered at start, 0400 (the default), before the event stream is even up.
    assert read(dest) == "password=first-pass\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o400
    await until(lambda: sc.events.state == "connected", "the event stream")

    reader = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", READER, env={"PATH": os.environ["PATH"], "PIDFILE": str(pidfile), "CONF": str(dest),
                                      "SEEN": str(seen)})
    try:
        await until(lambda: read(pidfile) is not None and read(pidfile).strip() == str(reader.pid), "the pidfile")
        await until(sc.renderer.idle, "the renderer to settle")

        st, out = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "second-pass"})
        assert st == 200, out
        took = await until(lambda: read(dest) == "password=second-pass\n", "the file to change", timeout=3)
        assert took < 1.0, f"the rendered file changed {took:.2f}s after the rotation (events on: want < 1 s)"
        assert stat.S_IMODE(dest.stat().st_mode) == 0o400

        # The program itself, signalled, read the new file.
        await until(lambda: read(seen) is not None and "second-pass" in read(seen), "the reader's reload")
        await until(sc.renderer.idle, "the renderer to settle")
        assert metric(sc, "skm_sidecar_render_reloads_total", block="db", action="signal", outcome="ok") == 1
        assert read(seen).splitlines() == ["reloaded: password=second-pass"]     # exactly once

        (d,) = sc.renderer.delivered()
        assert d.name == "db" and d.error is None and d.delivered_at is not None
        assert [(k.key_id, k.version) for k in d.keys] == [(key["keyId"], 1)]
        assert d.reload.outcome == "ok" and d.reload.detail == f"SIGHUP to pid {reader.pid}"
        async with unix_session(sc.config.listen.socket) as s:
            async with s.get("/metrics") as r:
                text = await r.text()
            async with s.get("/v1/status") as r:
                status = await r.json()
        assert 'skm_sidecar_render_reloads_total{action="signal",block="db",outcome="ok"} 1.0' in text
        assert status["render"][0]["keys"] == [{"ref": "apps/db-password", "keyId": key["keyId"], "version": 1}]
        assert "second-pass" not in text and "second-pass" not in str(status)
    finally:
        reader.send_signal(signal.SIGTERM)
        await reader.wait()


async def test_a_missing_key_fails_closed_and_recovers_when_it_appears(skm, store, sidecars, run_dir):
    dest = run_dir / "api.env"
    sc = await sidecars({"name": "api", "template": "API_TOKEN={{ secret('apps/api-token') }}\n",
                         "destination": str(dest), "mode": "0440"})
    assert not dest.exists()                                     # nothing written
    assert metric(sc, "skm_sidecar_renders_total", block="api", outcome="failed") >= 1
    assert metric(sc, "skm_sidecar_render_failing", block="api") == 1
    async with unix_session(sc.config.listen.socket) as s:
        async with s.get("/healthz") as r:
            assert r.status == 503
            body = await r.json()
        assert body["status"] == "degraded"
        assert "apps/api-token" in body["problems"]["render"] and "no key named" in body["problems"]["render"]

        await until(lambda: sc.events.state == "connected", "the event stream")
        key = await skm.key(store, "SECRET", "api-token", secretValue="tok-1")     # key_created: rendered at once
        await until(lambda: read(dest) == "API_TOKEN=tok-1\n", "the file to appear", timeout=3)
        assert stat.S_IMODE(dest.stat().st_mode) == 0o440
        # The file is in place a moment before the renderer marks the block healthy again.
        await until(lambda: metric(sc, "skm_sidecar_render_failing", block="api") == 0, "the block healthy")
        async with s.get("/healthz") as r:
            assert r.status == 200

        # Scheduled for deletion: the server refuses the key, and the file goes (fail closed).
        st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/schedule-deletion")
        assert st == 200
        await until(lambda: not dest.exists(), "the file to be removed", timeout=3)
        await until(sc.renderer.idle, "the renderer to settle")
        assert metric(sc, "skm_sidecar_renders_total", block="api", outcome="removed") == 1
        async with s.get("/healthz") as r:
            assert r.status == 503


async def test_the_file_is_never_seen_half_written_or_wider(skm, store, sidecars, run_dir):
    key = await skm.key(store, "SECRET", "blob", secretValue="0" * 20000)
    dest = run_dir / "blob.txt"
    sc = await sidecars({"name": "blob", "template": "BEGIN\n{{ secret('apps/blob') }}\nEND\n",
                         "destination": str(dest), "debounce": 0})
    await until(lambda: sc.events.state == "connected", "the event stream")
    bad: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for entry in os.scandir(run_dir):            # the temp files too: never wider than the file
                try:
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
                if mode & ~0o400:
                    bad.append(f"{entry.name} had mode {oct(mode)}")
            try:
                text = dest.read_text()
            except FileNotFoundError:
                bad.append("the file was missing")
                continue
            reads[0] += 1
            body = text[len("BEGIN\n"):-len("\nEND\n")]
            if not (text.startswith("BEGIN\n") and text.endswith("\nEND\n") and len(body) == 20000
                    and body == body[0] * 20000):
                bad.append(f"a read of {len(text)} bytes was not one whole rendering")

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for i in range(1, 31):
            ch = "0123456789abcdefghijklmnopqrstuvwxyz"[i]
            st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": ch * 20000})
            assert st == 200
            await until(lambda: (read(dest) or "").startswith("BEGIN\n" + ch), f"rendering {i}")
    finally:
        stop.set()
        await asyncio.to_thread(t.join, 5)
    await until(sc.renderer.idle, "the renderer to settle")
    assert metric(sc, "skm_sidecar_renders_total", block="blob", outcome="written") >= 31
    assert reads[0] > 30
    assert bad == []
    assert [p.name for p in run_dir.iterdir()] == ["blob.txt"]      # no temp file left behind


async def test_reload_by_command_and_by_local_post(skm, store, sidecars, run_dir, tmp_path):
    key = await skm.key(store, "SECRET", "cfg", secretValue="one")
    posts: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        posts.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/-/reload", hook)
    runner, port = await serve(app)
    marker = tmp_path / "command.log"
    try:
        sc = await sidecars(
            {"name": "by-command", "template": "{{ secret('apps/cfg') }}", "destination": str(run_dir / "a"),
             "reload_command": ["/bin/sh", "-c", f'echo "$SKM_RENDER_NAME $SKM_RENDER_DESTINATION" >> {marker}']},
            {"name": "by-post", "template": "{{ secret('apps/cfg') }}", "destination": str(run_dir / "b"),
             "reload_post": f"http://127.0.0.1:{port}/-/reload"})
        await until(lambda: sc.events.state == "connected", "the event stream")
        await until(sc.renderer.idle, "the renderer to settle")
        assert not marker.exists() and posts == []          # first render: nothing had read an older file
        st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "two"})
        assert st == 200
        await until(lambda: len(posts) == 1 and read(marker) is not None, "both reloads")
        await until(sc.renderer.idle, "the renderer to settle")
        assert read(marker) == f"by-command {run_dir / 'a'}\n"
        assert posts == [{"name": "by-post", "destination": str(run_dir / "b")}]
        outcomes = {d.name: (d.reload.action, d.reload.outcome, d.reload.detail) for d in sc.renderer.delivered()}
        assert outcomes == {"by-command": ("command", "ok", "exit status 0"), "by-post": ("post", "ok", "HTTP 204")}
    finally:
        await runner.cleanup()


# ------------------------------------------------------------ refused at start
BASE_TOML = '''appkey = "App1"
[upstream]
urls = ["https://127.0.0.1:1"]
cert = "/nonexistent/host.pem"
key = "/nonexistent/host-key.pem"
[listen]
socket = "{sock}"
'''


@pytest.mark.parametrize("block, message", [
    ('template = "{{{{ secret(\'a/b\') }}}}"\ndestination = "{dir}/f"\nmode = "0644"',
     "mode 0644 gives others access"),
    ('template = "x"\ndestination = "{dir}/f"\nreload_command = ["/bin/true"]\nreload_post = "http://127.0.0.1:9/"',
     "give one reload action, not reload_command and reload_post"),
    ('template = "x"\ndestination = "{dir}/f"\ndestinaton = "/tmp/typo"',
     "unknown setting(s) render[0].destinaton"),
    ('template = "x"\ndestination = "{open}/f"', "writable by everyone"),
    ('template = "{{{{ secret(\'a/b\') "\ndestination = "{dir}/f"', "template syntax error on line 1"),
    ('template = "x"\ndestination = "{dir}/f"\nreload_signal = "HUP"', "reload_signal needs reload_pidfile"),
    ('template = "x"\ndestination = "{dir}/f"\nreload_post = "http://10.1.2.3/reload"', "on this host"),
])
def test_bad_render_blocks_are_refused_at_start(tmp_path, block, message):
    import subprocess
    d = tmp_path / "out"
    d.mkdir(mode=0o700)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)                           # world-writable, no sticky bit
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text(BASE_TOML.format(sock=tmp_path / "s.sock") + "[[render]]\n"
                   + block.format(dir=d, open=open_dir) + "\n")
    r = subprocess.run([sys.executable, "-m", "server.cli.main", "sidecar", "--check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(d.iterdir()) == []


async def test_without_events_the_ttl_picks_up_a_change(skm, store, sidecars, run_dir):
    key = await skm.key(store, "SECRET", "ttl-secret", secretValue="old")
    dest = run_dir / "ttl.txt"
    sc = await sidecars({"name": "ttl", "template": "{{ secret('apps/ttl-secret') }}", "destination": str(dest)},
                        events={"enabled": False}, cache={"ttl": 0.5})
    assert sc.events is None and read(dest) == "old"
    st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "new"})
    assert st == 200
    await until(lambda: read(dest) == "new", "the TTL re-render", timeout=5)


async def test_a_burst_of_changes_makes_one_render(skm, store, sidecars, run_dir):
    key = await skm.key(store, "SECRET", "bursty", secretValue="v")
    sc = await sidecars({"name": "burst", "template": "{{ secret('apps/bursty') }}",
                         "destination": str(run_dir / "burst"), "debounce": 0.2})
    await until(lambda: sc.events.state == "connected", "the event stream")
    await until(sc.renderer.idle, "the renderer to settle")
    (block,) = sc.renderer.blocks
    before = block.renders
    for _ in range(20):
        sc.renderer.on_event("secret_updated", {"key_id": key["keyId"]})
    sc.renderer.on_event("secret_updated", {"key_id": "f" * 32})      # another key: no render of its own
    await until(sc.renderer.idle, "the renderer to settle")
    assert block.renders == before + 1


async def test_public_keys_and_data_keys_render_too(skm, store, sidecars, run_dir):
    import base64

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    signing = await skm.key(store, "ASYMMETRIC_KEY", "signing")
    data = await skm.key(store, "SYMMETRIC_KEY", "file-key", exportable=True)
    await skm.key(store, "SYMMETRIC_KEY", "locked-key")
    sc = await sidecars(
        {"name": "keys", "template": "{{ public_key('apps/signing') }}KEY={{ data_key('" + data["keyId"] + "') }}\n",
         "destination": str(run_dir / "keys")},
        {"name": "locked", "template": "{{ data_key('apps/locked-key') }}", "destination": str(run_dir / "locked")})
    text = (run_dir / "keys").read_text()
    pem, _, rest = text.partition("-----END PUBLIC KEY-----\n")
    load_pem_public_key((pem + "-----END PUBLIC KEY-----\n").encode())          # a valid SPKI PEM
    assert rest.startswith("KEY=") and len(base64.b64decode(rest[4:].strip())) == 32
    by_name = {d.name: d for d in sc.renderer.delivered()}
    assert {(k.key_id, k.version) for k in by_name["keys"].keys} == {(signing["keyId"], 0), (data["keyId"], 0)}
    # A key that may not leave the server fails closed.
    assert not (run_dir / "locked").exists() and "Export" in by_name["locked"].error


async def test_owner_group_and_mode_decide_who_reads_the_file(skm, store, sidecars, request):
    import pwd
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip(reason="needs root and setpriv (util-linux) to give the file away and read it as others")
    import tempfile

    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="skm-render-"))     # outside pytest's 0700 tree, so others can reach it
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    d.chmod(0o755)
    dest = d / "app.conf"
    await skm.key(store, "SECRET", "owned", secretValue="for-nobody-only")
    await sidecars({"name": "owned", "template": "{{ secret('apps/owned') }}", "destination": str(dest),
                    "owner": "nobody", "group": str(nobody.pw_gid), "mode": "0400"})
    st = dest.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o400)

    async def cat_as(uid: int, gid: int) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "cat", str(dest),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        return p.returncode, (out or err).decode()

    assert await cat_as(nobody.pw_uid, nobody.pw_gid) == (0, "for-nobody-only")
    rc, err = await cat_as(54321, 54321)
    assert rc != 0 and "Permission denied" in err
