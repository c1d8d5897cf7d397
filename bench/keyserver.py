"""Our key server for the benchmark: prepared in-process, then run as `skm server run --config`.

`prepare()` initialises a data dir, starts the server in-process once to create
the benchmark key store (IPv4 127.0.0.1 AND a registered client certificate),
its keys (1 KB secret, AES-256-GCM, RSA-2048, EC P-256), a v1.3 bearer token
and a ciphertext to decrypt, and writes the client certificate as one PEM (ab
-E) plus a second certificate for the sidecar. `launch()` starts the real
server process pinned to the server core.
"""
from __future__ import annotations

import base64
import secrets
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

from bench import procs
from server.access.pki import write_pem

SECRET_1K = "s" * 1024
PLAINTEXT_1K = "p" * 1024
SIGN_INPUT = base64.b64encode(b"m" * 256).decode()
ACTOR = "bench"


@dataclass
class Identity:
    cert: Path
    key: Path
    combined: Path          # certificate + key in one PEM, for ab -E


@dataclass
class Fixture:
    dir: Path
    config: Path
    appkey: str
    keystore_id: int
    keys: dict[str, str]
    token: str
    ciphertext: str
    ca: Path
    client: Identity
    sidecar: Identity
    extra: dict = field(default_factory=dict)
    operator_token: str = field(default="", repr=False)    # admin, for management-API steps (backup)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                if k not in ("token", "operator_token")}


def config_text(data_dir: Path, storage: str = "", workers: int = 1) -> str:
    lines = [f'data_dir = "{data_dir}"', 'log_format = "json"', 'log_level = "warning"', "purge_interval = 3600.0"]
    if storage:
        lines.append(f'storage = "{storage}"')
    lines += ["[data]", 'host = "127.0.0.1"', "port = 0", "[mgmt]", 'host = "127.0.0.1"', "port = 0"]
    return "\n".join(lines) + "\n"


async def register_identity(rt, ks, name: str, out: Path) -> Identity:
    """A client certificate registered to key store `ks` through the certificate service, as PEM files."""
    password = secrets.token_urlsafe(12)
    await rt.certificates.create(ks, name, password, 30, "benchmark client", actor=ACTOR)
    bundle = await rt.certificates.bundle(ks, name)
    key, cert, _chain = pkcs12.load_key_and_certificates(bundle, password.encode())
    cert_pem = cert.public_bytes(Encoding.PEM)
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    ident = Identity(out / f"{name}.pem", out / f"{name}-key.pem", out / f"{name}-combined.pem")
    write_pem(ident.cert, cert_pem, private=False)
    write_pem(ident.key, key_pem, private=True)
    write_pem(ident.combined, cert_pem + key_pem, private=True)
    return ident


async def prepare(root: Path, storage: str = "", *, bulk_keys: int = 0, quiet: bool = False) -> Fixture:
    from server.app import KeyServer
    from server.config import load
    from server.init import init_server
    from server.settings import ServerConfig

    shutil.rmtree(root, ignore_errors=True)       # a fresh data dir each time (--workdir reuse)
    root.mkdir(parents=True)
    data = root / "data"
    cfg_path = root / "server.toml"
    cfg_path.write_text(config_text(data, storage))
    cfg = load(ServerConfig, cfg_path, env={})
    init = await init_server(cfg)
    server = await KeyServer(cfg).start()
    try:
        rt = server.runtime
        if rt.certificates is None:
            raise RuntimeError("server.access.certificates is missing: the benchmark store needs certificate auth")
        project = await rt.keys.project_by_appkey(init.appkey)
        ks = await rt.keys.create_keystore(project.id, "bench", "benchmark store: IPv4 AND certificate",
                                           ip4_auth=True, cert_auth=True, auth_mode="AND", actor=ACTOR)
        await rt.authdata.add(ks, "ipv4s", "127.0.0.1", actor=ACTOR)
        client = await register_identity(rt, ks, "bench-client", root)
        side = await register_identity(rt, ks, "bench-sidecar", root)
        keys = {
            "secret": (await rt.keys.create_key(ks, "SECRET", "bench-secret", actor=ACTOR,
                                                secret_value=SECRET_1K)).id,
            "aes": (await rt.keys.create_key(ks, "SYMMETRIC_KEY", "bench-aes", actor=ACTOR)).id,
            "rsa": (await rt.keys.create_key(ks, "ASYMMETRIC_KEY", "bench-rsa", actor=ACTOR,
                                             key_spec="RSA-2048")).id,
            "ec": (await rt.keys.create_key(ks, "ASYMMETRIC_KEY", "bench-ec", actor=ACTOR,
                                            key_spec="EC-P256")).id,
        }
        aes = await rt.keys.key(keys["aes"])
        ciphertext, _ = await rt.keys.encrypt(aes, PLAINTEXT_1K)
        op = await rt.operators.by_name(init.operator)
        access_key, _secret = await rt.callers.create_key(op, actor=ACTOR, description="benchmark",
                                                          project_id=project.id)
        token = (await rt.callers.issue_token(access_key, 86400))["access_token"]
        if bulk_keys > len(keys):
            from bench.scale import bulk_secrets
            await bulk_secrets(rt, ks.id, bulk_keys - len(keys), label=f"{bulk_keys:,} keys", quiet=quiet)
    finally:
        await server.stop()
    return Fixture(dir=root, config=cfg_path, appkey=init.appkey, keystore_id=ks.id, keys=keys, token=token,
                   ciphertext=ciphertext, ca=init.ca_cert, client=client, sidecar=side, operator_token=init.token)


def launch(fx: Fixture, *, event_loop: str = "auto", workers: int = 1, name: str = "skm",
           unkeyed_audit: bool = False) -> procs.Proc:
    """`skm server run --config` pinned to the server core, on the given event loop (`unkeyed_audit`: the
    audit writer before keyed links, through bench/serve.py, as the baseline of their cost)."""
    args = ["server", "run", "--config", str(fx.config)] + (["--workers", str(workers)] if workers > 1 else [])
    cmd = ([sys.executable, "-m", "bench.serve", "--unkeyed-audit", "--", *args] if unkeyed_audit
           else [procs.venv_bin("skm"), *args])
    p = procs.start(name, cmd, fx.dir / f"{name}.log", env={"SKM_EVENT_LOOP": event_loop})
    m = p.wait_for(r"data plane https://[\d.]+:(\d+), management https://[\d.]+:(\d+)")
    p.info = {"data_url": f"https://127.0.0.1:{m.group(1)}", "mgmt_url": f"https://127.0.0.1:{m.group(2)}"}
    return p


def client_url(p: procs.Proc, fx: Fixture, path: str, version: str = "v1.0") -> str:
    return f"{p.info['data_url']}/keymanager/{version}/appkey/{fx.appkey}{path}"
