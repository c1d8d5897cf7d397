"""A private Docker engine for tests, and the locally built base image.

No registry is reachable here, so nothing is pulled: `base_rootfs()` debootstraps
a minimal Debian (python3, venv, PostgreSQL) once per machine into
/var/tmp/skm-docker-cache (SKM_DOCKER_CACHE overrides) as a tarball, and
`Dockerd.import_image()` turns it into an image inside a private engine whose
state lives in a temp dir (`dockerd --data-root/--exec-root/-H unix://...`),
removed at stop. Tests skip, naming the package, when docker.io, docker-compose
or debootstrap is missing.

    with Dockerd.start() as d:                      # DOCKER_HOST for child processes: d.env
        d.import_image(base_rootfs(), "skm-base")
        d.run("build", "-t", "x", ".")
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["BASE_PACKAGES", "Dockerd", "base_rootfs", "cache_dir", "debian_mirror", "docker_skip_reason"]

BASE_PACKAGES = ("python3", "python3-venv", "postgresql-15", "ca-certificates")
SUITE = "bookworm"
# The Debian client binary: a docker CLI elsewhere on PATH may be another build.
DOCKER_CLI_CANDIDATES = ("/usr/bin/docker",)


def cache_dir() -> Path:
    d = Path(os.environ.get("SKM_DOCKER_CACHE", "/var/tmp/skm-docker-cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def docker_cli() -> str | None:
    for c in DOCKER_CLI_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("docker")


def docker_skip_reason() -> str | None:
    """Why the real Docker bring-up cannot run here, or None."""
    if os.geteuid() != 0:
        return "the Docker bring-up needs root (a private dockerd)"
    if shutil.which("dockerd") is None or docker_cli() is None:
        return "dockerd not found: apt-get install docker.io"
    if shutil.which("docker-compose") is None:
        return "docker-compose not found: apt-get install docker-compose"
    if shutil.which("debootstrap") is None:
        return "debootstrap not found (builds the local base image): apt-get install debootstrap"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 or one-line sources)."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list"),
                                                                          *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for f in files:
        with contextlib.suppress(OSError):
            text = f.read_text()
            for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
                if "security" not in m.group(1):
                    return m.group(1)
            for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
                if "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs(packages: tuple[str, ...] = BASE_PACKAGES) -> Path:
    """A tarball of a minimal Debian root with `packages`, made once per machine (about 2 minutes)."""
    tag = hashlib.sha256(f"{SUITE} {' '.join(sorted(packages))} v1".encode()).hexdigest()[:12]
    cache = cache_dir()
    out = cache / f"skm-base-{SUITE}-{tag}.tar"
    if out.exists():
        return out
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # two runs on one machine build it once
        if out.exists():
            return out
        work = Path(tempfile.mkdtemp(prefix="skm-debootstrap-", dir=cache))
        try:
            root = work / "root"
            p = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
                                str(root), debian_mirror()], capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"debootstrap failed ({p.returncode}): {p.stderr[-2000:] or p.stdout[-2000:]}")
            # Smaller and deterministic enough: no apt lists, caches or docs in the image.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                         "usr/share/locale"):
                shutil.rmtree(root / junk, ignore_errors=True)
                (root / junk).mkdir(parents=True, exist_ok=True)
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True,
                           timeout=600)
            os.replace(partial, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass
class Dockerd:
    """A dockerd of our own: state, sockets and logs under one temp dir, removed at stop()."""
    base: Path
    proc: subprocess.Popen | None = None
    images: list[str] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.base / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        """Environment for docker / docker-compose children."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        return {**keep, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    @classmethod
    @contextlib.contextmanager
    def start(cls, timeout: float = 60.0) -> Iterator["Dockerd"]:
        d = cls(Path(tempfile.mkdtemp(prefix="skm-dockerd-")))
        try:
            d._start(timeout)
            yield d
        finally:
            d.stop()

    def _start(self, timeout: float) -> None:
        # A short exec-root: containerd's socket paths must stay under 108 bytes.
        for sub in ("root", "exec"):
            (self.base / sub).mkdir()
        log = open(self.base / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.base / "root"), "--exec-root", str(self.base / "exec"),
             "-H", f"unix://{self.sock}", "--pidfile", str(self.base / "dockerd.pid"),
             "--bridge=none", "--iptables=false", "--ip-masq=false", "--userland-proxy=false",
             "--storage-driver=overlay2" if self._overlay_ok() else "--storage-driver=vfs"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.sock.exists() and self.run("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dockerd did not answer in {timeout}s:\n{self.log_tail()}")

    @staticmethod
    def _overlay_ok() -> bool:
        with contextlib.suppress(OSError):
            return "overlay" in Path("/proc/filesystems").read_text()
        return False

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.base / "dockerd.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def run(self, *args: str, check: bool = True, timeout: float = 600, cwd: Path | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        cli = docker_cli()
        assert cli is not None
        p = subprocess.run([cli, *args], env=self.env, capture_output=True, timeout=timeout, cwd=cwd, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stderr.decode(errors='replace')[-3000:]}")
        return p

    def compose(self, project_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess:
        p = subprocess.run(["docker-compose", "--no-ansi", *args], cwd=project_dir, env={**self.env, **(env or {})},
                           capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stdout.decode(errors='replace')[-3000:]}\n{p.stderr.decode(errors='replace')[-3000:]}")
        return p

    def import_image(self, tarball: Path, tag: str) -> None:
        with open(tarball, "rb") as f:
            cli = docker_cli()
            assert cli is not None
            p = subprocess.run([cli, "import", "--change", 'CMD ["/bin/bash"]', "-", tag], stdin=f, env=self.env,
                               capture_output=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"docker import failed: {p.stderr.decode(errors='replace')[-2000:]}")
        self.images.append(tag)

    def inspect(self, what: str) -> list[dict]:
        return json.loads(self.run("inspect", what).stdout)

    def stop(self) -> None:
        """Stop every container, the engine, and remove its state (mounts first)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("ps", "-aq", check=False, timeout=30).stdout.decode().split()
                if ids:
                    self.run("rm", "-f", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # containerd-shim processes and overlay mounts may outlive dockerd: clean both.
        self._kill_leftover_shims()
        self._unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill_leftover_shims(self) -> None:
        marker = str(self.base).encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if marker in cmd:
                    os.kill(int(pid), signal.SIGKILL)

    @staticmethod
    def _unmount_under(base: Path) -> None:
        with contextlib.suppress(OSError):
            mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            for m in sorted((m for m in mounts if m.startswith(str(base))), key=len, reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
