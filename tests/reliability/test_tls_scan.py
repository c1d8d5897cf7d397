"""sslyze scans of the data plane, the management plane and the system-key server.

sslyze pins cryptography<47 and the project needs >=48, so it is not in the project's venv:
the scans run in tests/reliability/sslyze_scan.py under .venv-tools/bin/python (built by
`make .venv-tools/.installed`, and by `make test`), which prints the facts as JSON; this
test judges them.

The servers run as `skm server run` subprocesses with no OPENSSL_CONF of the test's: the
package's own server/openssl.cnf (set by server/__init__.py) limits the key-exchange groups to
X25519/P-256/P-384 (Python 3.11 has no set_groups; see platform-notes): Mozilla "intermediate"
fails on OpenSSL's default groups (X448, P-521, ffdhe). Each scan must COMPLETE (a listener
that wants a client certificate makes sslyze discard the scan silently otherwise), offer
TLS 1.2+ only, AEAD suites only, no weak curves, a chain that validates against the server's
own CA, and pass Mozilla intermediate.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.reliability.procs import REPO, clean_env
from tests.reliability.systemkey_env import systemkey_env

TOOLS_PYTHON = REPO / ".venv-tools" / "bin" / "python"
SCAN_SCRIPT = Path(__file__).with_name("sslyze_scan.py")
SCAN_TIMEOUT = 600
PACKAGED_OPENSSL_CONF = REPO / "server" / "openssl.cnf"
WEAK_CURVES = {"secp192r1", "secp224r1", "prime192v1", "prime239v1", "sect163k1", "sect233k1", "brainpoolP256r1"}

pytestmark = pytest.mark.skipif(not TOOLS_PYTHON.exists(),
                                reason=f"{TOOLS_PYTHON} missing: sslyze lives in its own venv, "
                                       "run make .venv-tools/.installed (make test builds it)")


async def scan(port: int, ca: Path, cert: Path | None, key: Path | None) -> dict:
    """One sslyze scan in the tools venv; its facts as a dict."""
    args = [str(TOOLS_PYTHON), str(SCAN_SCRIPT), "--host", "127.0.0.1", "--port", str(port), "--ca", str(ca)]
    if cert:
        args += ["--cert", str(cert), "--key", str(key)]
    # clean_env drops OPENSSL_CONF: importing `server` set it in this process, and the scanner's
    # own client must not be limited to the groups the servers are meant to offer.
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=clean_env())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCAN_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"sslyze scan of port {port} took over {SCAN_TIMEOUT}s")
    assert proc.returncode == 0, (f"sslyze_scan.py exited {proc.returncode} (is sslyze installed in "
                                  f".venv-tools? run make .venv-tools/.installed):\n{err.decode(errors='replace')}")
    return json.loads(out)


def findings(result: dict) -> tuple[list[str], dict]:
    """Everything wrong with one scan, and the facts for the report."""
    problems: list[str] = []
    assert result["scan_status"] == "COMPLETED", (
        f"scan did not complete: {result['scan_status']} {result['connectivity_error']}")
    for name, attempt in result["commands"].items():
        if not attempt["completed"]:
            problems.append(f"{name} did not complete: {attempt['status']} {attempt['error']}")
    accepted = result["accepted"]
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        if accepted[old]:
            problems.append(f"{old} accepted: {accepted[old]}")
    if not accepted["tls_1_2"] and not accepted["tls_1_3"]:
        problems.append("neither TLS 1.2 nor 1.3 accepted")
    for suite in accepted["tls_1_2"]:
        if not any(a in suite for a in ("_GCM_", "CHACHA20_POLY1305")) or "ECDHE" not in suite:
            problems.append(f"non-AEAD or non-ECDHE TLS 1.2 suite: {suite}")
    curves = result["curves"]
    weak = [c for c in curves if c in WEAK_CURVES or c not in ("X25519", "prime256v1", "secp256r1", "secp384r1")]
    if weak:
        problems.append(f"curves beyond X25519/P-256/P-384: {weak}")
    for dep in result["certificate_deployments"] or []:
        custom = [v for v in dep if v["custom_ca"]]
        if not custom or not all(v["valid"] for v in custom):
            problems.append(f"chain does not validate against the server's CA: "
                            f"{[(v['trust_store'], v['error']) for v in dep]}")
    if result["client_renegotiation_dos"]:
        problems.append("client-initiated renegotiation accepted")
    if result["mozilla_intermediate_issues"]:
        problems.append(f"not Mozilla intermediate compliant: {result['mozilla_intermediate_issues']}")
    facts = {"tls1.2 suites": len(accepted["tls_1_2"]), "tls1.3 suites": len(accepted["tls_1_3"]), "curves": curves}
    return problems, facts


async def test_tls_scans_of_every_listener(server_proc, tmp_path, numbers):
    # No OPENSSL_CONF for `skm server run`: it must limit its groups through the packaged server/openssl.cnf.
    # The harness starts the system-key server with `python -c "import asyncio ..."`, and asyncio imports
    # ssl (OpenSSL reads its config then) before `server` can set OPENSSL_CONF: that process gets it explicitly.
    async with systemkey_env(tmp_path, server_proc, start_systemkey=False, start_server=False) as sk:
        sk.systemkey.env["OPENSSL_CONF"] = str(PACKAGED_OPENSSL_CONF)
        await sk.systemkey.start()
        srv = sk.server
        assert "OPENSSL_CONF" not in srv.env
        await srv.start(wait_unsealed=False)
        await srv.wait_unsealed()
        cert, key = srv.client_cert("scanner")
        targets = [("data plane", srv.data_port, srv.ca, cert, key),
                   ("management plane", srv.mgmt_port, srv.ca, None, None),
                   # the system-key server requires a certificate: scan with the key server's own
                   ("system-key server", sk.port, sk.pki.ca_pem, sk.pki.keyserver_cert, sk.pki.keyserver_key)]
        report = {}
        for label, port, ca, c, k in targets:
            result = await scan(port, ca, c, k)
            problems, facts = findings(result)
            report[label] = problems
            numbers.add("tls", f"{label}: scan {result['scan_status']}, {facts}, problems {len(problems)}")
        # The trap from platform-notes: without a certificate the system-key scan must not pass as complete.
        blind = await scan(sk.port, sk.pki.ca_pem, None, None)
        assert blind["scan_status"] != "COMPLETED" or not any(blind["accepted"][v] for v in ("tls_1_2", "tls_1_3"))
        numbers.add("tls", f"system-key server without a client certificate: scan {blind['scan_status']} "
                           "(refused, as it must be)")
    bad = {k: v for k, v in report.items() if v}
    assert not bad, bad
