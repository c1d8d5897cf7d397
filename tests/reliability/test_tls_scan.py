"""sslyze scans of the data plane, the management plane and the system-key server.

The servers run as subprocesses with OPENSSL_CONF limiting the key-exchange groups to
X25519/P-256/P-384 (Python 3.11 has no set_groups; see platform-notes): Mozilla
"intermediate" fails on OpenSSL's default groups (X448, P-521, ffdhe). Each scan
must COMPLETE (a listener that wants a client certificate makes sslyze discard the
scan silently otherwise), offer TLS 1.2+ only, AEAD suites only, no weak curves,
a chain that validates against the server's own CA, and pass Mozilla intermediate.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from sslyze import (ClientAuthenticationCredentials, Scanner, ScanCommand, ScanCommandAttemptStatusEnum,
                    ScanCommandsExtraArguments, ServerNetworkConfiguration, ServerNetworkLocation,
                    ServerScanRequest, ServerScanStatusEnum)
from sslyze.mozilla_tls_profile.tls_config_checker import (SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
                                                           MozillaTlsConfiguration,
                                                           ServerNotCompliantWithTlsConfiguration,
                                                           TlsConfigurationEnum,
                                                           check_server_against_tls_configuration)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument

from tests.reliability.procs import openssl_conf
from tests.reliability.systemkey_env import systemkey_env

WEAK_CURVES = {"secp192r1", "secp224r1", "prime192v1", "prime239v1", "sect163k1", "sect233k1", "brainpoolP256r1"}
COMMANDS = {ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES, ScanCommand.TLS_1_0_CIPHER_SUITES,
            ScanCommand.TLS_1_1_CIPHER_SUITES, ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES,
            ScanCommand.ELLIPTIC_CURVES, ScanCommand.CERTIFICATE_INFO, ScanCommand.TLS_COMPRESSION,
            ScanCommand.SESSION_RENEGOTIATION, ScanCommand.HEARTBLEED, ScanCommand.TLS_FALLBACK_SCSV,
            ScanCommand.OPENSSL_CCS_INJECTION, ScanCommand.ROBOT} | set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER)


def scan(port: int, ca: Path, cert: Path | None, key: Path | None):
    creds = ClientAuthenticationCredentials(certificate_chain_path=cert, key_path=key) if cert else None
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", port),
        network_configuration=ServerNetworkConfiguration(tls_server_name_indication="127.0.0.1",
                                                         tls_client_auth_credentials=creds),
        scan_commands=COMMANDS,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca)))
    scanner = Scanner()
    scanner.queue_scans([request])
    return list(scanner.get_results())[0]


def findings(result, ca: Path) -> tuple[list[str], dict]:
    """Everything wrong with one scan, and the facts for the report."""
    problems: list[str] = []
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, (
        f"scan did not complete: {result.scan_status} {result.connectivity_error_trace}")
    r = result.scan_result
    for name in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites",
                 "tls_1_2_cipher_suites", "tls_1_3_cipher_suites", "elliptic_curves", "certificate_info",
                 "tls_compression", "session_renegotiation", "heartbleed", "openssl_ccs_injection", "robot"):
        attempt = getattr(r, name)
        if attempt.status != ScanCommandAttemptStatusEnum.COMPLETED:
            problems.append(f"{name} did not complete: {attempt.status} {attempt.error_reason}")
    accepted = {}
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        res = getattr(r, f"{name}_cipher_suites").result
        accepted[name] = [c.cipher_suite.name for c in res.accepted_cipher_suites] if res else []
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        if accepted[old]:
            problems.append(f"{old} accepted: {accepted[old]}")
    if not accepted["tls_1_2"] and not accepted["tls_1_3"]:
        problems.append("neither TLS 1.2 nor 1.3 accepted")
    for suite in accepted["tls_1_2"]:
        if not any(a in suite for a in ("_GCM_", "CHACHA20_POLY1305")) or "ECDHE" not in suite:
            problems.append(f"non-AEAD or non-ECDHE TLS 1.2 suite: {suite}")
    curves_res = r.elliptic_curves.result
    curves = [c.name for c in curves_res.supported_curves] if curves_res and curves_res.supported_curves else []
    weak = [c for c in curves if c in WEAK_CURVES or c not in ("X25519", "prime256v1", "secp256r1", "secp384r1")]
    if weak:
        problems.append(f"curves beyond X25519/P-256/P-384: {weak}")
    cert_info = r.certificate_info.result
    if cert_info is not None:
        for dep in cert_info.certificate_deployments:
            custom = [v for v in dep.path_validation_results if v.trust_store.path == ca]
            if not custom or not all(v.was_validation_successful for v in custom):
                problems.append(f"chain does not validate against the server's CA: "
                                f"{[(v.trust_store.name, v.validation_error) for v in dep.path_validation_results]}")
    reneg = r.session_renegotiation.result
    if reneg is not None and reneg.is_vulnerable_to_client_renegotiation_dos:
        problems.append("client-initiated renegotiation accepted")
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE))
    except ServerNotCompliantWithTlsConfiguration as e:
        problems.append(f"not Mozilla intermediate compliant: {e.issues}")
    facts = {"tls1.2 suites": len(accepted["tls_1_2"]), "tls1.3 suites": len(accepted["tls_1_3"]), "curves": curves}
    return problems, facts


async def test_tls_scans_of_every_listener(server_proc, tmp_path, numbers):
    conf = openssl_conf(tmp_path)
    env = {"OPENSSL_CONF": str(conf)}
    async with systemkey_env(tmp_path, server_proc, env=env) as sk:
        srv = sk.server
        await srv.wait_unsealed()
        cert, key = srv.client_cert("scanner")
        targets = [("data plane", srv.data_port, srv.ca, cert, key),
                   ("management plane", srv.mgmt_port, srv.ca, None, None),
                   # the system-key server requires a certificate: scan with the key server's own
                   ("system-key server", sk.port, sk.pki.ca_pem, sk.pki.keyserver_cert, sk.pki.keyserver_key)]
        report = {}
        for label, port, ca, c, k in targets:
            result = await asyncio.to_thread(scan, port, ca, c, k)
            problems, facts = findings(result, ca)
            report[label] = problems
            numbers.add("tls", f"{label}: scan {result.scan_status.name}, {facts}, problems {len(problems)}")
        # The trap from platform-notes: without a certificate the system-key scan must not pass as complete.
        blind = await asyncio.to_thread(scan, sk.port, sk.pki.ca_pem, None, None)
        assert blind.scan_status != ServerScanStatusEnum.COMPLETED or not any(
            getattr(blind.scan_result, f"tls_1_{v}_cipher_suites").result
            and getattr(blind.scan_result, f"tls_1_{v}_cipher_suites").result.accepted_cipher_suites for v in (2, 3))
        numbers.add("tls", f"system-key server without a client certificate: scan {blind.scan_status.name} "
                           "(refused, as it must be)")
    bad = {k: v for k, v in report.items() if v}
    assert not bad, bad

