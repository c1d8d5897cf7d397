"""compose.yaml is valid Compose and everything it names exists.

Validated against the Compose Specification schema (../shared/reference/compose-spec.schema.json
beside the repository); then the cross-references the schema cannot see: services in
depends_on, named volumes and networks, every file the containers are told to run or read
(docker/ scripts, configs, and the /certs files that the certs-init step really writes), and
every environment variable (interpolated ones have defaults; those set for a container are
read by it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import load
from server.settings import ServerConfig
from server.systemkey.settings import SystemKeyServerConfig
from sidecar.settings import SidecarConfig

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "reference" / "compose-spec.schema.json"
COMPOSE = REPO / "compose.yaml"
DOCKER = REPO / "docker"
# Where the image puts things (Dockerfile): container path prefix -> repository directory.
IMAGE_PATHS = {"/opt/skm/docker/": DOCKER, "/etc/skm/": DOCKER / "config"}
SKM_SERVICES = {"certs-init", "systemkey", "keyserver", "sidecar", "demo-app"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_matches_the_compose_specification(compose):
    if not SCHEMA.exists():
        pytest.skip(reason=f"{SCHEMA} not found (shared/ is checked out beside the repository)")
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_docker_compose_v1_accepts_it():
    if shutil.which("docker-compose") is None:
        pytest.skip(reason="docker-compose not found: apt-get install docker-compose")
    # v1 rejects what the spec allows but it does not know (top-level name:, per-network mac_address).
    p = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                       cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("SKM_")}, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_services_the_demo_needs(compose):
    services = compose["services"]
    assert {"certs-init", "postgres", "systemkey", "keyserver", "sidecar", "demo-app"} <= set(services)
    assert services["keyserver"]["deploy"]["replicas"] == 2
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", services["sidecar"]["mac_address"])
    # The MAC the sidecar gets is the one certs-init binds into its host certificate.
    assert services["certs-init"]["environment"]["SKM_DEMO_SIDECAR_MAC"] == services["sidecar"]["mac_address"]
    for name in ("postgres", "systemkey", "keyserver", "sidecar"):
        assert "healthcheck" in services[name], name


def test_references_resolve(compose):
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {}) | {"default"}
    used_volumes = set()
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
        for v in svc.get("volumes") or []:
            source = v.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
                used_volumes.add(source)
        for n in svc.get("networks") or []:
            assert n in networks, f"{name} joins undeclared network {n}"
        build = svc.get("build")
        if build:
            ctx = REPO / build["context"]
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file()
    assert used_volumes == volumes, f"declared but unused: {volumes - used_volumes}"
    # Every service that shares the socket or the demo ids mounts the same volume at the same place.
    mounts = {n: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes") or []} for n, s in services.items()}
    assert mounts["sidecar"]["/run/skm"] == mounts["demo-app"]["/run/skm"]
    assert mounts["keyserver"]["/shared"] == mounts["sidecar"]["/shared"] == mounts["demo-app"]["/shared"]


def _container_paths(text: str) -> set[str]:
    return set(re.findall(r"(/(?:opt/skm/docker|etc/skm|certs|shared|run/skm|var/lib/[\w-]+)/[\w./-]*[\w])", text))


def test_every_file_the_containers_use_exists(compose, tmp_path, monkeypatch):
    """Scripts and configs come from docker/; /certs files are those certs-init writes (run here)."""
    import asyncio
    import importlib.util
    spec = importlib.util.spec_from_file_location("skm_docker_bootstrap", DOCKER / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    monkeypatch.setattr(bootstrap, "CERTS", tmp_path / "certs")
    assert asyncio.run(bootstrap.certs()) == 0
    texts = [COMPOSE.read_text(), *(p.read_text() for p in (DOCKER / "config").glob("*.toml")),
             (DOCKER / "keyserver.sh").read_text(), (REPO / "Dockerfile").read_text()]
    written_by_containers = ("/shared/", "/run/skm/", "/var/lib/")
    for path in sorted(set().union(*map(_container_paths, texts))):
        if path.startswith(written_by_containers):
            continue
        if path.startswith("/certs/"):
            local = tmp_path / "certs" / path[len("/certs/"):]
        else:
            prefix = next(p for p in IMAGE_PATHS if path.startswith(p))
            local = IMAGE_PATHS[prefix] / path[len(prefix):]
        assert local.exists(), f"{path} is used but nothing provides it ({local})"
    # Private keys come out 0600.
    keys = [p for p in (tmp_path / "certs").rglob("*") if p.is_file() and (p.name.endswith("-key.pem")
                                                                            or p.name.endswith((".key", "keyring.json")))]
    assert len(keys) == 6, keys
    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, key


def test_configs_load_with_the_real_loaders(tmp_path):
    ServerConfig_ = load(ServerConfig, DOCKER / "config" / "keyserver.toml", env={})
    assert ServerConfig_.systemkey.source == "remote"
    assert ServerConfig_.systemkey.urls == ("https://systemkey:8445",)
    sk = load(SystemKeyServerConfig, DOCKER / "config" / "systemkey.toml", env_prefix="SKM_SYSTEMKEY_", env={})
    assert sk.port == 8445
    sc = load(SidecarConfig, DOCKER / "config" / "sidecar.toml", env_prefix="SKM_SIDECAR_",
              env={"SKM_SIDECAR_APPKEY": "demoAppkey123"})
    # The [[render]] files go to the app-run volume, mounted at /run/app in the containers that read them.
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for block in sc.render:
        for path in (block.destination, block.reload_pidfile):
            assert not path or path.startswith("/run/app/"), path
    for name in ("sidecar", "demo-file-app", "demo-psql"):
        assert any(v.split(":")[:2] == ["app-run", "/run/app"] for v in services[name]["volumes"]), name
    assert services["demo-file-app"]["pid"] == "service:sidecar"      # the sidecar signals the pid it wrote
    # Validated as the container sees them: with /run/app (a directory the check requires) here under tmp_path.
    run = tmp_path / "run-app"
    run.mkdir(mode=0o750)
    here = lambda p: p and str(run / Path(p).name)      # noqa: E731
    sc = dataclasses.replace(sc, render=tuple(dataclasses.replace(b, destination=here(b.destination),
                                                                  reload_pidfile=here(b.reload_pidfile))
                                              for b in sc.render))
    sc.validate()
    assert {b.name for b in sc.render} == {"demo-db", "demo-pgpass"}
    assert sc.upstream.urls == ("https://keyserver:8443",)


def test_environment_variables(compose):
    text = COMPOSE.read_text()
    # Interpolated variables all have defaults: a bare `docker compose up` needs none set.
    for m in re.finditer(r"(?<!\$)\$\{([^}]*)\}", text):     # $${...} is the shell's, not compose's
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*:-[^}]*", m.group(1)), f"${{{m.group(1)}}} has no default"
    # Variables set for a container are read by it: by a config loader or by a docker/ script.
    scripts = "\n".join(p.read_text() for p in DOCKER.glob("*.py")) + (DOCKER / "keyserver.sh").read_text()
    loaders = {"SKM_": ServerConfig, "SKM_SYSTEMKEY_": SystemKeyServerConfig, "SKM_SIDECAR_": SidecarConfig}
    for name, svc in compose["services"].items():
        for var in svc.get("environment") or {}:
            if name == "postgres":
                assert var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
                assert var in (DOCKER / "postgres-entrypoint.sh").read_text()
                continue
            read = var in scripts or any(_config_field(cls, var[len(p):]) for p, cls in loaders.items()
                                         if var.startswith(p))
            assert read, f"{name}: {var} is set but nothing reads it"


def _config_field(cls, rest: str) -> bool:
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        n = f.name.upper()
        if rest == n:
            return True
        if rest.startswith(n + "_") and dataclasses.is_dataclass(hints[f.name]):
            return _config_field(hints[f.name], rest[len(n) + 1:])
    return False
