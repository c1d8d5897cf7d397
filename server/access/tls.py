"""TLS contexts for every listener and client in the project.

TLS 1.2+ only, ECDHE with AEAD suites only, no renegotiation. The data plane
asks for a client certificate but does not require one (a key store decides);
the system-key server requires one.
"""
from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def server_context(cert: Path, key: Path, client_ca: Path | None = None, *, require_client: bool = False
                   ) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        # Optional on the data plane: a key store decides whether it needs a certificate, but one
        # that is presented must verify (another CA's or an expired one fails the handshake).
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
        # RFC 5280 strictness for client certificates (as Python 3.13 does for its clients).
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def peer_der(transport) -> bytes | None:
    """The DER client certificate verified in this connection's handshake, or None."""
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_obj is None:
        return None
    return ssl_obj.getpeercert(binary_form=True) or None


def peer_identity(request) -> tuple[bytes | None, str | None]:
    """(DER, SHA-256 hex fingerprint) of the request's verified client certificate, or (None, None).

    Read once per connection and kept on its protocol object (DeadlineRequestHandler.peer_identity):
    with renegotiation off the certificate cannot change on a connection, and a kept-alive client
    otherwise paid a DER copy and a hash twice per request (client context and audit)."""
    proto = request.protocol
    memo = getattr(proto, "peer_identity", None)
    if memo is not None:
        return memo
    transport = request.transport
    der = peer_der(transport)
    memo = (der, hashlib.sha256(der).hexdigest() if der else None)
    if transport is not None and hasattr(proto, "peer_identity"):
        proto.peer_identity = memo
    return memo


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
