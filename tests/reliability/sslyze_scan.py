"""One sslyze scan, printed as JSON: run by .venv-tools/bin/python, never imported by the suite.

sslyze pins cryptography<47 and the project needs >=48, so sslyze lives in its own venv
(`make .venv-tools/.installed`). This script only gathers facts; test_tls_scan.py judges them.

    sslyze_scan.py --host 127.0.0.1 --port 8443 --ca ca.pem [--cert client.pem --key client-key.pem]
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
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

COMMANDS = {ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES, ScanCommand.TLS_1_0_CIPHER_SUITES,
            ScanCommand.TLS_1_1_CIPHER_SUITES, ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES,
            ScanCommand.ELLIPTIC_CURVES, ScanCommand.CERTIFICATE_INFO, ScanCommand.TLS_COMPRESSION,
            ScanCommand.SESSION_RENEGOTIATION, ScanCommand.HEARTBLEED, ScanCommand.TLS_FALLBACK_SCSV,
            ScanCommand.OPENSSL_CCS_INJECTION, ScanCommand.ROBOT} | set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER)
CHECKED = ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites",
           "tls_1_2_cipher_suites", "tls_1_3_cipher_suites", "elliptic_curves", "certificate_info",
           "tls_compression", "session_renegotiation", "heartbleed", "openssl_ccs_injection", "robot")
VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")


def scan(host: str, port: int, ca: Path, cert: Path | None, key: Path | None):
    creds = ClientAuthenticationCredentials(certificate_chain_path=cert, key_path=key) if cert else None
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(host, port),
        network_configuration=ServerNetworkConfiguration(tls_server_name_indication=host,
                                                         tls_client_auth_credentials=creds),
        scan_commands=COMMANDS,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca)))
    scanner = Scanner()
    scanner.queue_scans([request])
    return list(scanner.get_results())[0]


def facts(result, ca: Path) -> dict:
    out: dict = {"scan_status": result.scan_status.name,
                 "connectivity_error": ("".join(result.connectivity_error_trace.format())
                                        if result.connectivity_error_trace else None)}
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        return out
    r = result.scan_result
    out["commands"] = {}
    for name in CHECKED:
        attempt = getattr(r, name)
        out["commands"][name] = {"status": attempt.status.name,
                                 "completed": attempt.status == ScanCommandAttemptStatusEnum.COMPLETED,
                                 "error": str(attempt.error_reason) if attempt.error_reason else None}
    out["accepted"] = {}
    for name in VERSIONS:
        res = getattr(r, f"{name}_cipher_suites").result
        out["accepted"][name] = [c.cipher_suite.name for c in res.accepted_cipher_suites] if res else []
    curves_res = r.elliptic_curves.result
    out["curves"] = ([c.name for c in curves_res.supported_curves]
                     if curves_res and curves_res.supported_curves else [])
    cert_info = r.certificate_info.result
    out["certificate_deployments"] = None if cert_info is None else [
        [{"trust_store": v.trust_store.name, "custom_ca": v.trust_store.path == ca,
          "valid": v.was_validation_successful, "error": v.validation_error}
         for v in dep.path_validation_results]
        for dep in cert_info.certificate_deployments]
    reneg = r.session_renegotiation.result
    out["client_renegotiation_dos"] = None if reneg is None else reneg.is_vulnerable_to_client_renegotiation_dos
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE))
        out["mozilla_intermediate_issues"] = {}
    except ServerNotCompliantWithTlsConfiguration as e:
        out["mozilla_intermediate_issues"] = {str(k): str(v) for k, v in e.issues.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", type=Path, required=True, help="CA the server's chain must validate against")
    p.add_argument("--cert", type=Path, help="client certificate (chain) for listeners that want one")
    p.add_argument("--key", type=Path, help="client certificate's key")
    a = p.parse_args(argv)
    if bool(a.cert) != bool(a.key):
        p.error("--cert and --key go together")
    try:
        result = scan(a.host, a.port, a.ca, a.cert, a.key)
        json.dump(facts(result, a.ca), sys.stdout, default=str)
    except Exception:
        traceback.print_exc()
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
