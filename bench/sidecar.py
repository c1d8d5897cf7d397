"""Our sidecar for the benchmark: `skm sidecar --config` in front of the benchmark key server,
with its registered host certificate, its Unix socket and its 127.0.0.1 listener (which ab can
drive with the anti-SSRF header). A long cache TTL keeps the secret a cache hit for the run;
push invalidation stays on, as in production."""
from __future__ import annotations

import sys
from pathlib import Path

from bench import procs
from bench.keyserver import Fixture

ANTI_SSRF = {"X-SKM-Request": "1"}


def config_text(fx: Fixture, upstream: str, socket: Path, reads: bool = True) -> str:
    return "\n".join([
        f'appkey = "{fx.appkey}"', 'log_format = "json"', 'log_level = "warning"',
        "[upstream]", f'urls = ["{upstream}"]', f'ca = "{fx.ca}"', f'cert = "{fx.sidecar.cert}"',
        f'key = "{fx.sidecar.key}"',
        "[listen]", f'socket = "{socket}"', "tcp_port = 0",
        "tcp_allow_default = true",             # the bench's own throwaway host: any local user may read
        "[cache]", "ttl = 600.0",
        # Read auditing is on by default; the bench's baseline turns it off to show its cost (issue 17).
        "[reads]", f"enabled = {'true' if reads else 'false'}",
    ]) + "\n"


def launch(fx: Fixture, upstream: str, name: str = "sidecar", *, uvloop: bool = False,
           reads: bool = True) -> procs.Proc:
    """`skm sidecar --config` pinned to the server core; on uvloop (through bench.serve) when asked;
    `reads=False`: without read auditing (the baseline of its cost)."""
    sock = fx.dir / f"{name}.sock"
    cfg = fx.dir / f"{name}.toml"
    cfg.write_text(config_text(fx, upstream, sock, reads))
    args = ["sidecar", "--config", str(cfg)]
    cmd = [sys.executable, "-m", "bench.serve", "--uvloop", "--", *args] if uvloop else [procs.venv_bin("skm"), *args]
    p = procs.start(name, cmd, fx.dir / f"{name}.log")
    m = p.wait_for(r"sidecar: serving (\S+) and http://127\.0\.0\.1:(\d+)")
    p.info = {"socket": m.group(1), "tcp_url": f"http://127.0.0.1:{m.group(2)}"}
    return p
