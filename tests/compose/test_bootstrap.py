"""The compose containers' entry points as processes, as the containers run them.

`docker stop` sends SIGTERM to the container's PID 1, and a PID 1 has no default action for it:
without a handler the engine waits out its timeout and kills. Here the system-key step runs as
PID 1 of a PID namespace of its own (`unshare --pid --fork`), where the kernel applies the same rule.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "docker" / "bootstrap.py"


def _env(certs: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "SKM_DEMO_CERTS": str(certs), **extra}


class Lines:
    """A process's stderr, read by a thread (a buffered pipe and select() do not mix)."""

    def __init__(self, stream) -> None:
        self.text = ""
        self.closed = threading.Event()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.text += line
        self.closed.set()

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline and not self.closed.is_set(), f"no {needle!r}:\n{self.text}"
            self.closed.wait(0.05)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_systemkey_step_stops_on_sigterm_as_pid_1(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip(reason="running the step as PID 1 needs root and unshare (util-linux)")
    certs = tmp_path / "certs"
    made = subprocess.run([sys.executable, str(BOOTSTRAP), "certs"], env=_env(certs), capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    conf = tmp_path / "systemkey.toml"
    conf.write_text(f'data_dir = "{tmp_path / "sk"}"\nhost = "127.0.0.1"\nport = 0\n'
                    f'cert = "{certs / "systemkey.pem"}"\nkey = "{certs / "systemkey-key.pem"}"\n'
                    f'client_ca = "{certs / "ca.pem"}"\nlog_format = "json"\n')
    proc = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(BOOTSTRAP), "systemkey"],
                            env=_env(certs, SKM_SYSTEMKEY_CONFIG=str(conf)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        err = Lines(proc.stderr)
        err.wait_for("serving https://127.0.0.1:", 60)
        (step,) = _children(proc.pid)                   # PID 1 inside its namespace
        nspid = next(line for line in Path(f"/proc/{step}/status").read_text().splitlines()
                     if line.startswith("NSpid:")).split()[1:]
        assert nspid == [str(step), "1"]
        os.kill(step, signal.SIGTERM)
        rc = proc.wait(timeout=5)                       # docker stop would wait 10 s, then kill
        err.closed.wait(5)
        assert rc == 0 and "[systemkey] stopped" in err.text, err.text
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
