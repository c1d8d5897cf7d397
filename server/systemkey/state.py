"""The system-key server's state directory.

* keyring.json: the wrapped keyring (every system-key version wrapped by the root
  key); this process never holds the root key, so it never sees a system key.
* allowed.txt: SHA-256 fingerprints of key-server certificates allowed to fetch,
  one per line (`<64 hex> [note]`, `#` comments).
* audit.jsonl: append-only JSON lines, one per fetch (time, peer fingerprint, result).

File operations here are blocking and small; the server calls them in a thread.
"""
from __future__ import annotations

import datetime as dt
import hmac
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from server import jsonlines
from server.access.pki import fingerprint
from server.barrier.keyring import WrappedKeyring, load_keyring_file, save_keyring_file
from server.errors import ConfigError, InvalidRequest
from server.systemkey.settings import SystemKeyServerConfig

_FP_RE = re.compile(r"^[0-9a-f]{64}$")


def normalize_fingerprint(value: str) -> str:
    """64 lowercase hex from `AB:CD:...` (openssl) or plain hex; InvalidRequest otherwise."""
    fp = re.sub(r"[\s:]", "", value.strip()).lower()
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:"):]
    if not _FP_RE.match(fp):
        raise InvalidRequest("a key-server fingerprint is the SHA-256 of its certificate: 64 hex digits "
                             "(`openssl x509 -noout -fingerprint -sha256 -in CERT`)")
    return fp


def cert_file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 fingerprint of a PEM certificate file (what `allow` takes)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"certificate file {path} does not exist") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None
    return fingerprint(cert.public_bytes(Encoding.DER))


def _write_private_text(path: Path, text: str) -> None:
    """Atomic replace, 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def validate_keyring(ring: WrappedKeyring) -> None:
    if not ring.versions:
        raise ConfigError("the wrapped keyring holds no system-key version")
    if ring.current not in ring.versions or ring.current in ring.retired:
        raise ConfigError("the wrapped keyring's current version is missing or retired")
    for v, blob in ring.versions.items():
        if v < 1 or len(blob) < 12 + 32 + 16:
            raise ConfigError(f"system-key version {v} in the wrapped keyring is malformed")


class SystemKeyState:
    def __init__(self, cfg: SystemKeyServerConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.data_path
        self.keyring_path = cfg.keyring_path()
        self.allow_path = cfg.allow_list_path()
        self.audit_path = cfg.audit_log_path()

    def exists(self) -> bool:
        return self.keyring_path.exists()

    def require(self) -> None:
        if not self.exists():
            raise ConfigError(f"no system-key state in {self.dir}; run `skm systemkey init --keyring FILE` first")

    # --- keyring ------------------------------------------------------------
    def create(self, ring: WrappedKeyring) -> None:
        validate_keyring(ring)
        if self.exists():
            raise ConfigError(f"{self.keyring_path} already exists; the system-key server is initialised "
                              "(use `skm systemkey rotate` to add a version)")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        save_keyring_file(self.keyring_path, ring)
        if not self.allow_path.exists():
            _write_private_text(self.allow_path, "# SHA-256 fingerprints of key-server certificates allowed to fetch\n")
        fd = os.open(self.audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    def load_keyring(self) -> WrappedKeyring:
        self.require()
        ring = load_keyring_file(self.keyring_path)
        validate_keyring(ring)
        return ring

    def save_keyring(self, ring: WrappedKeyring) -> None:
        validate_keyring(ring)
        save_keyring_file(self.keyring_path, ring)

    # --- allow-list ---------------------------------------------------------
    def allow_entries(self) -> list[tuple[str, str]]:
        """(fingerprint, note) pairs; a malformed line is an error, not silently skipped."""
        try:
            text = self.allow_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fp, _, note = line.partition(" ")
            if not _FP_RE.match(fp):
                raise ConfigError(f"{self.allow_path} line {n} is not a SHA-256 fingerprint")
            out.append((fp, note.strip()))
        return out

    def allowed(self) -> list[str]:
        return [fp for fp, _ in self.allow_entries()]

    def is_allowed(self, fp: str) -> bool:
        """Constant-time against every entry (no early exit)."""
        probe = fp.lower().encode()
        hit = False
        for entry in self.allowed():
            hit |= hmac.compare_digest(entry.encode(), probe)
        return hit

    def _write_allow(self, entries: list[tuple[str, str]]) -> None:
        lines = ["# SHA-256 fingerprints of key-server certificates allowed to fetch"]
        lines += [f"{fp} {note}".rstrip() for fp, note in entries]
        _write_private_text(self.allow_path, "\n".join(lines) + "\n")

    def allow(self, fp: str, note: str = "") -> bool:
        fp = normalize_fingerprint(fp)
        note = re.sub(r"[\r\n#]", " ", note).strip()
        entries = self.allow_entries()
        if any(e == fp for e, _ in entries):
            return False
        self._write_allow([*entries, (fp, note)])
        return True

    def revoke(self, fp: str) -> bool:
        fp = normalize_fingerprint(fp)
        entries = self.allow_entries()
        kept = [(e, n) for e, n in entries if e != fp]
        if len(kept) == len(entries):
            return False
        self._write_allow(kept)
        return True

    # --- audit --------------------------------------------------------------
    def audit(self, *, peer_fingerprint: str | None, result: str, **fields: Any) -> None:
        """Append one JSON line (O_APPEND, fsync): never key material, only identities and outcomes."""
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                  "peer_fingerprint": peer_fingerprint, "result": result, **fields}
        jsonlines.append(self.audit_path, record)

    def audit_records(self) -> list[dict]:
        return jsonlines.read(self.audit_path)
