"""`skm demo` as a user runs it (serving, not --once): a real process on free ports (`--port 0`), so it
never meets another run's :8442-8444.

What a user relies on: a console login and a CLI token printed once, the `export` line whole on one
line however narrow the terminal, no warnings for the expected start-up, a re-run that replaces the
login instead of piling up tokens, and SIGTERM or Ctrl-C stopping everything the demo started.
"""
from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKM = [sys.executable, "-m", "server.cli.main"]


class Demo:
    """One `skm demo` process; its output is read by threads (pipes and select() do not mix with buffering)."""

    def __init__(self, data_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "50", "SKM_CONFIG": "/nonexistent"}
        # A process group of its own, as a terminal gives it: Ctrl-C is a SIGINT to that whole group.
        self.proc = subprocess.Popen([*SKM, "demo", "--data-dir", str(data_dir), "--port", "0"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out, self.err = [""], [""]
        for stream, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream, buf: list[str]) -> None:
        for line in stream:
            buf[0] += line

    def wait_serving(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while "Press Ctrl-C to stop." not in self.out[0]:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.out[0] + self.err[0]
            time.sleep(0.1)
        return self.out[0]

    def children(self) -> set[int]:
        found: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            found |= {int(c) for c in (task / "children").read_text().split()}
        return found

    def terminate(self) -> None:
        if self.proc.poll() is None:
            for pid in self.children():
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


def _login(out: str) -> dict:
    (export,) = [line for line in out.splitlines() if line.startswith("export ")]
    env = dict(re.findall(r"(SKM_\w+)=(\S+)", export))
    assert set(env) == {"SKM_ADDR", "SKM_CACERT", "SKM_TOKEN"}, export
    assert re.fullmatch(r"skm_[0-9a-f]{16}_[\w-]{43}", env["SKM_TOKEN"]), export     # whole, on this one line
    assert Path(env["SKM_CACERT"]).is_file()
    name, password = re.search(r"^Console login: (\S+) / (\S+)$", out, re.M).groups()
    expires = re.search(r"the token expires (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", out).group(1)
    return {**env, "name": name, "password": password, "expires": expires}


def _api(login: dict, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=login["SKM_CACERT"])
    req = urllib.request.Request(f"{login['SKM_ADDR']}/api/v1{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _active_tokens(login: dict) -> list[dict]:
    st, out = _api(login, "GET", "/tokens?all=true", token=login["SKM_TOKEN"])
    assert st == 200, out
    return [t for t in out["body"]["tokens"] if t["status"] == "ACTIVE"]


def _stop(demo: Demo, ctrl_c: bool = False) -> None:
    """SIGTERM (or Ctrl-C: SIGINT to the demo's whole process group): the demo exits 0 and no process it
    started survives (the system-key server above all). The system-key server is out of the terminal's
    reach and stops after the key server, whose last audit checkpoint goes to it."""
    sk = int(re.search(r"system-key server \(pid (\d+)\)", demo.out[0]).group(1))
    children = demo.children()
    assert sk in children
    if ctrl_c:
        assert os.getpgid(sk) != os.getpgid(demo.proc.pid)    # the terminal's SIGINT does not reach it
        os.killpg(demo.proc.pid, signal.SIGINT)
    else:
        demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(timeout=30) == 0, demo.err[0]
    assert "checkpoint_not_stored" not in demo.out[0] + demo.err[0], demo.err[0]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, f"still running after the demo stopped: {children}"
        time.sleep(0.05)


def _project_show_prints_the_data_plane_url(out: str, login: dict) -> None:
    """`skm project show` with the demo's export line prints the data-plane URL the demo printed (the demo
    sets no public_url: the server derives it from its data listener)."""
    printed = re.search(r"Data plane: (\S+)", out).group(1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SKM_CONFIG": "/nonexistent", "COLUMNS": "80",
           **{k: login[k] for k in ("SKM_ADDR", "SKM_CACERT", "SKM_TOKEN")}}
    shown = subprocess.run([*SKM, "project", "show", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[-1:] == [printed] for line in shown.stdout.splitlines()), (printed, shown.stdout)


def test_demo_prints_a_login_replaces_it_on_rerun_and_stops_on_sigterm_and_ctrl_c(tmp_path):
    data = Path(f"/tmp/skm-demo-test-{os.getpid()}")       # short: the sidecar's socket path is under it
    first = Demo(data)
    try:
        out = first.wait_serving()
        login = _login(out)
        assert "warning" not in (out + first.err[0]).lower(), out + first.err[0]   # expected start-up is quiet
        active = _active_tokens(login)
        assert len(active) == 1 and active[0]["operator"] == login["name"] == "demo-admin"   # init's token revoked
        assert active[0]["expirationDatetime"].replace("T", " ").startswith(login["expires"])  # the real expiry
        st, body = _api(login, "POST", "/login", {"name": login["name"], "password": login["password"]})
        assert st == 200, body
        _project_show_prints_the_data_plane_url(out, login)
        _stop(first)

        second = Demo(data)
        try:
            again = _login(second.wait_serving())
            assert again["SKM_TOKEN"] != login["SKM_TOKEN"] and again["password"] != login["password"]
            st, _ = _api(again, "GET", "/whoami", token=login["SKM_TOKEN"])
            assert st == 401                                          # the first run's token is revoked ...
            assert [t["operator"] for t in _active_tokens(again)] == ["demo-admin"]   # ... and only one is live
            st, _ = _api(again, "POST", "/login", {"name": again["name"], "password": login["password"]})
            assert st == 401                                          # the old password is gone too
            _stop(second, ctrl_c=True)
        finally:
            second.terminate()
    finally:
        first.terminate()
        subprocess.run(["rm", "-rf", str(data)], check=False)
