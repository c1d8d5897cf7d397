"""Secure Key Manager server package."""
VERSION = "0.1.0"          # the server's version (API documents, backups' manifests)
import os as _os

# Before anything imports ssl: OpenSSL reads OPENSSL_CONF once, when it first initialises.
# The shipped config limits the TLS key-exchange groups to X25519/P-256/P-384 (Python 3.11
# has no SSLContext.set_groups). An OPENSSL_CONF set by the operator wins.
_os.environ.setdefault("OPENSSL_CONF", _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "openssl.cnf"))
