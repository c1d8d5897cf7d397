"""The `skm auth`, `skm accesskey` and `skm certs` commands against a real server (subprocesses)."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from server.access.pki import macs_of

SKM = str(Path(sys.executable).parent / "skm")


async def run(skm, *argv: str, env: dict | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    e = {**os.environ, "SKM_ADDR": skm.mgmt_url, "SKM_TOKEN": skm.init.token, "SKM_CACERT": str(skm.pki.ca_cert),
         "SKM_CONFIG": str(skm.tmp / "none.toml"), **(env or {})}
    p = await asyncio.create_subprocess_exec(SKM, *argv, env=e, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    return p.returncode, out.decode(), err.decode()


async def test_auth_commands(skm):
    store = await skm.keystore("cli", certificateAuthUse="Y")
    ks = str(store["keyStoreId"])
    pw = skm.tmp / "pw.txt"
    pw.write_text("cli-password-1\n")
    p12 = skm.tmp / "out.p12"
    rc, out, err = await run(skm, "auth", "cert", "create", ks, "c1", "--life-time", "30", "--password-file",
                             str(pw), "--out", str(p12), "--json")
    assert rc == 0, err
    assert json.loads(out)["name"] == "c1" and "cli-password-1" not in out
    assert stat.S_IMODE(p12.stat().st_mode) == 0o600
    key, cert, _ = pkcs12.load_key_and_certificates(p12.read_bytes(), b"cli-password-1")
    rc, out, err = await run(skm, "auth", "cert", "download", ks, "c1", "--out", str(skm.tmp / "again.p12"))
    assert rc == 0 and (skm.tmp / "again.p12").read_bytes() == p12.read_bytes()
    rc, out, err = await run(skm, "auth", "cert", "create", ks, "c2", env={"SKM_CERT_PASSWORD": "env-password-2"})
    assert rc == 0, err
    rc, out, _ = await run(skm, "auth", "cert", "list", ks, "--json")
    assert [c["name"] for c in json.loads(out)["certificates"]] == ["c1", "c2"]
    rc, _, err = await run(skm, "auth", "cert", "delete", ks, "c1", "--now")
    assert rc == 2 and "add --yes" in err             # cannot be undone: a script confirms with --yes
    rc, _, err = await run(skm, "auth", "cert", "delete", ks, "c1", "--now", "--yes")
    assert rc == 4, err                                # only a scheduled certificate is deleted at once
    for flags in ((), ("--cancel",), (), ("--now", "--yes")):
        rc, _, err = await run(skm, "auth", "cert", "delete", ks, "c1", *flags)
        assert rc == 0, err
    rc, out, _ = await run(skm, "auth", "cert", "list", ks, "--json")
    assert [c["name"] for c in json.loads(out)["certificates"]] == ["c2"]

    for kind, value, shown in (("ip", "10.0.0.0/24", "10.0.0.0/24"), ("mac", "AA-BB-CC-DD-EE-FF", "aa:bb:cc:dd:ee:ff")):
        rc, _, err = await run(skm, "auth", kind, "add", ks, value, "--description", "t")
        assert rc == 0, err
        rc, out, _ = await run(skm, "auth", kind, "list", ks, "--json")
        assert shown in [e["value"] for e in json.loads(out)["entries"]]
        for flags in ((), ("--now", "--yes")):
            rc, _, err = await run(skm, "auth", kind, "delete", ks, value, *flags)
            assert rc == 0, err
        rc, out, _ = await run(skm, "auth", kind, "list", ks, "--json")
        assert shown not in [e["value"] for e in json.loads(out)["entries"]]


async def test_accesskey_commands(skm):
    rc, out, err = await run(skm, "accesskey", "create", "--description", "ci", "--json")
    assert rc == 0, err
    created = json.loads(out)
    assert created["secretAccessKey"] and created["operator"] == "admin"
    rc, out, _ = await run(skm, "accesskey", "list", "--json")
    listed = json.loads(out)["accessKeys"]
    assert [k["accessKeyId"] for k in listed] == [created["accessKeyId"]]
    assert created["secretAccessKey"] not in out
    rc, _, err = await run(skm, "accesskey", "delete", created["accessKeyId"])
    assert rc == 0, err
    rc, _, _ = await run(skm, "accesskey", "delete", created["accessKeyId"])
    assert rc == 4
    rc, _, _ = await run(skm, "accesskey", "list", env={"SKM_TOKEN": "skm_bad_token"})
    assert rc == 3


async def test_certs_init_and_host(skm, tmp_path):
    rc, out, err = await run(skm, "certs", "init", "--dir", "pki", "--mac", "02:00:00:00:00:01", cwd=tmp_path)
    assert rc == 0, err
    d = tmp_path / "pki"
    for f in ("ca", "server", "systemkey", "host1"):
        assert (d / f"{f}.pem").exists()
        assert stat.S_IMODE((d / f"{f}-key.pem").stat().st_mode) == 0o600
    rc, _, err = await run(skm, "certs", "init", "--dir", "pki", "--mac", "02:00:00:00:00:01", cwd=tmp_path)
    assert rc == 5 and "--force" in err
    rc, out, err = await run(skm, "certs", "host", "web1", "--mac", "AA-BB-CC-DD-EE-FF,0200000000ff", "--dir", "pki",
                             "--p12", env={"SKM_P12_PASSWORD": "p12-password"}, cwd=tmp_path)
    assert rc == 0, err
    cert = x509.load_pem_x509_certificate((d / "web1.pem").read_bytes())
    assert macs_of(cert) == {"aa:bb:cc:dd:ee:ff", "02:00:00:00:00:ff"}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:skm:mac:aabbccddeeff" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert pkcs12.load_key_and_certificates((d / "web1.p12").read_bytes(), b"p12-password")[1] == cert
    rc, _, err = await run(skm, "certs", "host", "bad", "--mac", "zz", "--dir", "pki", cwd=tmp_path)
    assert rc == 2


def test_too_many_attempts_maps_to_its_error_and_exit_3():
    import pytest

    from server.cli.common import _raise_for
    from server.cli.main import exit_code
    from server.errors import TooManyAttempts
    env = {"header": {"resultCode": -1220, "resultMessage": "Too Many Attempts", "isSuccessful": False,
                      "resultDetail": "wait a minute"}, "body": None}
    with pytest.raises(TooManyAttempts) as e:
        _raise_for(429, env)
    assert e.value.detail == "wait a minute" and exit_code(e.value) == 3
