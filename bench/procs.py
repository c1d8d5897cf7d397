"""Processes of a benchmark: pinned start, wait for a line or a port, CPU and memory readings, stop."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cores(server_cores: int = 1) -> tuple[str | None, str | None]:
    """(server cores, client core) as taskset lists: the servers on `server_cores` cores and the load
    client on core 0 when the machine has a core to spare for it; with no core to spare the servers
    (and the client) run unpinned over every core (the `--cores 2` scaling run on a 2-core machine)."""
    n = len(os.sched_getaffinity(0))
    if not shutil.which("taskset"):
        return None, None
    if n > server_cores:
        return ("1" if server_cores == 1 else f"1-{server_cores}"), "0"
    return None, None


SERVER_CPU, CLIENT_CPU = cores()


def use_cores(server_cores: int) -> None:
    """Pin what starts from now on to `server_cores` server cores (see cores())."""
    global SERVER_CPU, CLIENT_CPU
    SERVER_CPU, CLIENT_CPU = cores(server_cores)


def cpu_set(spec: str | None) -> set[int] | None:
    """"1-2" -> {1, 2}; None -> None."""
    if spec is None:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pinned(cmd: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd


def venv_bin(name: str) -> str:
    """A console script of the interpreter running us (the project's venv), else from PATH."""
    p = Path(sys.executable).parent / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the process's combined output matches `pattern`; fail with its log otherwise."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            m = rx.search(text)
            if m:
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"{self.name} did not come up (exit {self.popen.poll()}); log tail:\n{tail}")

    def tree(self) -> list[int]:
        """This process and its live descendants (a key server with workers is a supervisor and N children)."""
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(OSError):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the process tree (and reaped children), from /proc."""
        total = 0.0
        for pid in self.tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
        return total

    def rss_mb(self) -> float:
        """Resident memory of the process tree."""
        total = 0.0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class Running:
    """A process tree we did not start (PostgreSQL's postmaster and its backends): CPU and memory only."""
    name: str
    pid: int
    info: dict = field(default_factory=dict)

    tree = Proc.tree
    cpu_seconds = Proc.cpu_seconds
    rss_mb = Proc.rss_mb

    def pin(self, cpu: str | None) -> None:
        """Pin the tree (and what the postmaster forks later) to `cpu`, like a server we start."""
        cpus = cpu_set(cpu)
        if cpus is None:
            return
        for pid in self.tree():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)

    def stop(self, timeout: float = 10.0) -> None:
        """Not ours to stop (the cluster's owner does)."""


def start(name: str, cmd: list[str], log: Path, *, cpu: str | None | bool = True, env: dict | None = None,
          cwd: Path | None = None) -> Proc:
    """Start `cmd` pinned to `cpu` (default: the server cores at the time of the call)."""
    if cpu is True:
        cpu = SERVER_CPU
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb")
    try:
        popen = subprocess.Popen(pinned(cmd, cpu), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, cwd=cwd)
    finally:
        out.close()
    return Proc(name, popen, log)
