"""The compose stack brought up for real on a private Docker engine (make test-long).

No registry is reachable, so: the base image is a debootstrapped Debian (cached per machine,
tests/support/docker.py), the project is installed in the image from wheels built here, and
the PostgreSQL service runs Debian's postgresql from the same base (SKM_POSTGRES_IMAGE). Then
`docker-compose up` with compose.yaml as users run it; the demo app must print its round trip
and exit 0; psql, a shell script and `skm run` get the demo password from the sidecar's rendered
files and environment, and again after a rotation. Afterwards one key-server replica is killed
and the app runs again through the sidecar's failover to the other one. Everything is torn down, engine included.

The secret-hygiene sweep (run last by `make test-long`) greps what the stack printed: the demo's
generated admin token and database passwords (both), the root key and the system keys are
registered from the running containers, and every service's logs are kept before `down`.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.docker import Dockerd, base_rootfs, cache_dir, docker_skip_reason
from tests.support.hygiene import register_compose

pytestmark = pytest.mark.long

REPO = Path(__file__).resolve().parents[2]


def _wheels(out: Path) -> None:
    """The project and every dependency as wheels, the dependencies cached per machine."""
    cache = cache_dir() / "wheels"
    cache.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(cache),
                        "--find-links", str(cache), str(REPO)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out.mkdir()
    for whl in cache.glob("*.whl"):
        if whl.name.startswith("secure_key_manager-"):
            shutil.move(str(whl), out / whl.name)     # this tree's build, never a stale one
        else:
            shutil.copy2(whl, out / whl.name)


def _context(tmp: Path) -> Path:
    """A build context like the repository's for the Dockerfile, with wheels instead of sources."""
    ctx = tmp / "context"
    ctx.mkdir()
    shutil.copy2(REPO / "Dockerfile", ctx / "Dockerfile")
    shutil.copytree(REPO / "docker", ctx / "docker")
    _wheels(ctx / "wheels")
    return ctx


def _containers(d: Dockerd, project: str, service: str) -> list[dict]:
    ids = d.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                "--filter", f"label=com.docker.compose.service={service}").stdout.decode().split()
    return [json.loads(d.run("inspect", i).stdout)[0] for i in ids]


def _wait_exit(d: Dockerd, project: str, service: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _containers(d, project, service)
        done = [c for c in found if c["State"]["Status"] == "exited"]
        if done:
            return done[0]
        time.sleep(1)
    raise AssertionError(f"{service} did not finish in {timeout}s")


def test_compose_up_runs_the_demo_app(tmp_path, hygiene):
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    rootfs = base_rootfs()                 # about 2 minutes the first time on a machine, then cached
    ctx = _context(tmp_path)
    project = f"skmci{uuid.uuid4().hex[:8]}"
    env = {"SKM_IMAGE": "skm:ci", "SKM_POSTGRES_IMAGE": "skm-postgres:ci"}
    with Dockerd.start() as d:
        d.import_image(rootfs, "skm-base")
        d.run("build", "-q", "--build-arg", "BASE_IMAGE=skm-base", "-t", "skm:ci", str(ctx), timeout=900)
        d.run("build", "-q", "-f", str(ctx / "docker" / "postgres.Dockerfile"), "--build-arg", "BASE_IMAGE=skm-base",
              "-t", "skm-postgres:ci", str(ctx / "docker"), timeout=600)
        compose = ["-p", project, "-f", str(REPO / "compose.yaml")]

        def read(service: str, path: str) -> bytes:       # a file from a running container of the stack
            return d.compose(REPO, *compose, "exec", "-T", service, "cat", path, env=env, timeout=60).stdout

        def keep(what: str, p: subprocess.CompletedProcess) -> None:    # output of containers `down` forgets
            hygiene.text(f"compose {project}: {what}", p.stdout.decode(errors="replace") +
                         p.stderr.decode(errors="replace"))
        try:
            # `up` waits for each depends_on condition (healthy, completed) before starting the next.
            d.compose(REPO, *compose, "up", "-d", "--no-build", env=env, timeout=600)
            app = _wait_exit(d, project, "demo-app", 180)
            logs = d.compose(REPO, *compose, "logs", "--no-color", "demo-app", env=env).stdout.decode()
            assert app["State"]["ExitCode"] == 0, logs + _all_logs(d, compose, env)
            assert "read secret db-password through the sidecar" in logs, logs
            assert "round trip OK" in logs, logs
            print(logs)                     # what a user sees (pytest -s)

            # Programs that read the password from a file or the environment, unchanged: a shell script
            # reading the rendered db.env, PostgreSQL's psql with the rendered .pgpass, and `skm run`.
            # The first password has 24 characters: "DB_PASSWORD=" + 24 + newline is 37 bytes.
            _wait_log(d, compose, env, "demo-file-app", "demo-file-app: read 37 bytes from /run/app/db.env")
            asyncio.run(register_compose(hygiene, read, f"compose {project}"))   # token, password #1, root, system keys
            _wait_log(d, compose, env, "demo-psql", "demo-psql: logged in as demo_app with .pgpass #1 from the sidecar")
            envapp = _wait_exit(d, project, "demo-env-app", 120)
            out = _logs(d, compose, env, "demo-env-app")
            assert envapp["State"]["ExitCode"] == 0 and "demo-env-app: DB_PASSWORD has 24 characters" in out, out

            # A rotation (the role's password, then `skm key rotate` in the key-server container): the sidecar
            # renders both files again on the push event and signals the file app; psql logs in with the new
            # .pgpass (the old password no longer works); `skm run` passes the new value.
            rot = d.compose(REPO, *compose, "exec", "-T", "keyserver", "python3", "/opt/skm/docker/bootstrap.py",
                            "rotate", env=env, check=False, timeout=120)
            keep("bootstrap.py rotate", rot)
            assert rot.returncode == 0, rot.stdout.decode()[-2000:] + rot.stderr.decode()[-2000:]
            _wait_log(d, compose, env, "demo-file-app", "demo-file-app: reloaded, 45 bytes")
            asyncio.run(register_compose(hygiene, read, f"compose {project} rotated"))   # password #2
            _wait_log(d, compose, env, "demo-psql", "demo-psql: logged in as demo_app with .pgpass #2 from the sidecar")
            again = d.compose(REPO, *compose, "run", "--rm", "--no-deps", "demo-env-app", env=env, check=False,
                              timeout=180)
            keep("run demo-env-app", again)
            assert again.returncode == 0 and "DB_PASSWORD has 32 characters" in again.stdout.decode(), \
                again.stdout.decode() + again.stderr.decode()[-2000:]
            shown = "".join(_logs(d, compose, env, s) for s in ("demo-file-app", "demo-psql", "demo-env-app"))
            print(shown)

            keyservers = _containers(d, project, "keyserver")
            assert len(keyservers) == 2 and all(c["State"]["Health"]["Status"] == "healthy" for c in keyservers)
            sidecar = _containers(d, project, "sidecar")[0]
            assert sidecar["Config"]["MacAddress"] == "02:42:0a:53:4b:4d"

            # Each replica dies in turn, whichever the sidecar was using: the app runs again each time (as
            # the README says: `run --rm --no-deps`, or compose would start the killed replica first), and
            # the killed one comes back (it may get another address: the sidecar looks the name up again).
            for victim, survivor in ((keyservers[0], keyservers[1]), (keyservers[1], keyservers[0])):
                d.run("kill", "-s", "KILL", victim["Id"])
                again = d.compose(REPO, *compose, "run", "--rm", "--no-deps", "demo-app", env=env, check=False,
                                  timeout=180)
                keep(f"run demo-app, {victim['Name']} killed", again)
                out = again.stdout.decode()
                assert again.returncode == 0 and "round trip OK" in out, out + again.stderr.decode()[-2000:]
                assert _state(d, survivor)["Running"] and not _state(d, victim)["Running"]   # --no-deps: still dead
                d.run("start", victim["Id"])
                _wait_healthy(d, victim, 180)

            # `stop` sends SIGTERM: the system-key server leaves by itself (exit 0), not killed (137) at the timeout.
            d.compose(REPO, *compose, "stop", "--timeout", "10", "systemkey", env=env, timeout=60)
            sk = _containers(d, project, "systemkey")[0]
            assert sk["State"]["ExitCode"] == 0, sk["State"]
        finally:
            # Every service's whole log, for the sweep, while the containers still exist.
            try:
                keep("logs", d.compose(REPO, *compose, "logs", "--no-color", env=env, check=False, timeout=180))
            except subprocess.TimeoutExpired:
                hygiene.text(f"compose {project}: logs", "docker-compose logs timed out: not grepped")
            d.compose(REPO, *compose, "down", "-v", "--timeout", "5", env=env, check=False, timeout=180)


def _logs(d: Dockerd, compose: list[str], env: dict, service: str) -> str:
    return d.compose(REPO, *compose, "logs", "--no-color", service, env=env).stdout.decode()


def _wait_log(d: Dockerd, compose: list[str], env: dict, service: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (out := _logs(d, compose, env, service)):
        assert time.monotonic() < deadline, f"{service} never printed {text!r}:\n{out}" + _all_logs(d, compose, env)
        time.sleep(1)


def _state(d: Dockerd, container: dict) -> dict:
    return json.loads(d.run("inspect", container["Id"]).stdout)[0]["State"]


def _wait_healthy(d: Dockerd, container: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _state(d, container).get("Health", {}).get("Status") != "healthy":
        assert time.monotonic() < deadline, f"{container['Name']} not healthy again after {timeout}s"
        time.sleep(1)


def _all_logs(d: Dockerd, compose: list[str], env: dict) -> str:
    return "\n--- all services ---\n" + d.compose(REPO, *compose, "logs", "--no-color", "--tail", "40", env=env,
                                                  check=False).stdout.decode()[-12000:]
