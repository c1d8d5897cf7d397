"""The config loader: no config file means the documented defaults (issue 18)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from server.config import load
from server.settings import ServerConfig
from tests.support.netns import Lab

ROOT = Path(__file__).resolve().parents[1]


def test_no_config_resolves_to_the_documented_ports():
    cfg = load(ServerConfig, None, env={})
    assert (cfg.data.port, cfg.mgmt.port) == (8443, 8444)
    assert cfg.data.host == cfg.mgmt.host == "127.0.0.1"
    # A partial table keeps the rest of its documented defaults; the environment still overrides.
    cfg = load(ServerConfig, None, env={"SKM_MGMT_PORT": "9444"}, overrides={"data": {"host": "0.0.0.0"}})
    assert (cfg.data.host, cfg.data.port, cfg.mgmt.port) == ("0.0.0.0", 8443, 9444)


def test_server_run_without_a_config_listens_on_8443_and_8444(tmp_path: Path):
    """`skm server run --data-dir D` in a network namespace of its own (the host's 8443/8444 may be taken)."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_")}
    env["PYTHONPATH"] = str(ROOT)
    skm = [sys.executable, "-m", "server.cli.main"]
    subprocess.run([*skm, "server", "init", "--data-dir", str(data)], check=True, capture_output=True, env=env,
                   timeout=120, cwd=tmp_path)
    log = tmp_path / "server.log"
    with Lab("cfg") as lab, open(log, "wb") as out:
        lab.popen("server", [*skm, "server", "run", "--data-dir", str(data)], stdout=out, stderr=subprocess.STDOUT,
                  env=env, cwd=tmp_path)
        deadline = time.monotonic() + 60
        line = None
        while time.monotonic() < deadline:
            line = re.search(r"key server: data plane https://([\d.]+):(\d+), management https://([\d.]+):(\d+)",
                             log.read_text())
            if line:
                break
            time.sleep(0.1)
        assert line, log.read_text()
        assert line.groups() == ("127.0.0.1", "8443", "127.0.0.1", "8444")
        # Both ports answer inside the namespace.
        for port in (8443, 8444):
            r = lab.run("server", ["curl", "-sS", "--cacert", str(data / "pki" / "ca.pem"),
                                   f"https://127.0.0.1:{port}/healthz"])
            assert r.returncode == 0 and '"ok"' in r.stdout, (port, r.stdout, r.stderr)
