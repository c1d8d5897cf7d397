"""Secure Key Manager server package."""
VERSION = "0.1.0"          # the server's version (API documents, backups' manifests)
import os as _os

# Before anything imports ssl: OpenSSL reads OPENSSL_CONF once, when it first initialises.
# The shipped config limits the TLS key-exchange groups to X25519/P-256/P-384 (Python 3.11
# has no SSLContext.set_groups). An OPENSSL_CONF set by the operator wins.
_OUR_OPENSSL_CONF = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "openssl.cnf")
_os.environ.setdefault("OPENSSL_CONF", _OUR_OPENSSL_CONF)


def child_environ() -> dict[str, str]:
    """The environment a program we start should get: ours, without the OPENSSL_CONF that points at our
    own config (set above, here or by the skm process that started us): another program must not load
    our OpenSSL config because we started it. An operator's own OPENSSL_CONF is passed on."""
    env = dict(_os.environ)
    if env.get("OPENSSL_CONF") == _OUR_OPENSSL_CONF:
        del env["OPENSSL_CONF"]
    return env
