"""Key material per spec and the operations on one key version.

The one place that knows how a spec generates, serialises and uses its keys;
loaded versions are cached by the service so a hot key is parsed once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import InvalidKeyType, InvalidRequest, InvalidUserData
from server.keys import formats

LEGACY_SIGN_MAX = 245
STANDARD_SIGN_MAX = 64 * 1024
RSA_ALGORITHMS = ("RSASSA-PSS", "RSASSA-PKCS1-v1_5")
# Immutable scheme objects, built once rather than per signature.
_SHA256 = hashes.SHA256()
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_PKCS1V15 = padding.PKCS1v15()


def generate(spec: str) -> tuple[bytes, bytes | None]:
    """(sealed-to-be private material, public DER or None). CPU-heavy for RSA: call in a thread."""
    if spec == "AES-256-GCM":
        return os.urandom(32), None
    if spec.startswith("RSA-"):
        key: Any = rsa.generate_private_key(65537, int(spec[4:]))
    elif spec == "EC-P256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif spec == "EC-P384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif spec == "ED25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise InvalidRequest(f"unknown key spec {spec!r}")
    priv = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


@dataclass
class SymmetricVersion:
    key_id: str
    version: int
    raw: bytes

    def __post_init__(self) -> None:
        self._aead = AESGCM(self.raw)

    def encrypt(self, plaintext: bytes) -> str:
        nonce = os.urandom(formats.NONCE)
        sealed = self._aead.encrypt(nonce, plaintext, formats.cipher_aad(self.key_id, self.version))
        return formats.pack_ciphertext(self.version, nonce, sealed)

    def decrypt(self, nonce: bytes, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, formats.cipher_aad(self.key_id, self.version))
        except InvalidTag:
            raise InvalidUserData("ciphertext does not decrypt under this key") from None


@dataclass
class AsymmetricVersion:
    key_id: str
    version: int
    spec: str
    der: bytes

    def __post_init__(self) -> None:
        self._key: Any = serialization.load_der_private_key(self.der, None)
        self._pub = self._key.public_key()
        # Built once per loaded version (the material cache keeps it), not per signature.
        self._ecdsa = ec.ECDSA(self._ec_hash()) if self.spec.startswith("EC-") else None
        self._described: dict[str, dict] = {}

    @property
    def is_rsa(self) -> bool:
        return self.spec.startswith("RSA-")

    def _ec_hash(self):
        return hashes.SHA384() if self.spec == "EC-P384" else hashes.SHA256()

    # -- legacy: RSA PKCS#1 v1.5 straight over the raw bytes (NHN's NONEwithRSA) --
    def sign_legacy(self, data: bytes) -> str:
        if len(data) > LEGACY_SIGN_MAX:
            raise InvalidUserData(f"plaintext must be {LEGACY_SIGN_MAX} bytes or less")
        if self.is_rsa:
            sig = self._key.sign(data, padding.PKCS1v15(), NoDigestInfo())
        else:
            sig = self._sign_native(data)
        return formats.pack_signature(self.version, sig)

    def verify_legacy(self, data: bytes, sig: bytes) -> bool:
        try:
            if self.is_rsa:
                self._pub.verify(sig, data, padding.PKCS1v15(), NoDigestInfo())
            else:
                self._verify_native(sig, data)
            return True
        except (InvalidSignature, ValueError):
            return False

    def _sign_native(self, data: bytes) -> bytes:
        if self.spec == "ED25519":
            return self._key.sign(data)
        return self._key.sign(data, self._ecdsa)

    def _verify_native(self, sig: bytes, data: bytes) -> None:
        if self.spec == "ED25519":
            self._pub.verify(sig, data)
        else:
            self._pub.verify(sig, data, self._ecdsa)

    # -- standard schemes --
    def algorithms(self) -> tuple[str, ...]:
        if self.is_rsa:
            return RSA_ALGORITHMS
        return ("ED25519",) if self.spec == "ED25519" else ("ECDSA",)

    def check_algorithm(self, algorithm: str | None) -> str:
        allowed = self.algorithms()
        if algorithm is None:
            return allowed[0]
        if algorithm not in allowed:
            raise InvalidKeyType(f"algorithm must be one of {', '.join(allowed)} for a {self.spec} key")
        return algorithm

    def describe(self, algorithm: str) -> dict:
        """The scheme's fields of a sign-standard answer (the caller copies them into its own dict)."""
        found = self._described.get(algorithm)
        if found is None:
            found = self._described[algorithm] = self._describe(algorithm)
        return found

    def _describe(self, algorithm: str) -> dict:
        if algorithm == "RSASSA-PSS":
            return {"algorithm": algorithm, "hashAlgorithm": "SHA-256", "mgfAlgorithm": "MGF1-SHA-256", "saltLength": 32}
        if algorithm == "RSASSA-PKCS1-v1_5":
            return {"algorithm": algorithm, "hashAlgorithm": "SHA-256"}
        if algorithm == "ECDSA":
            return {"algorithm": algorithm, "hashAlgorithm": self._ec_hash().name.upper().replace("SHA", "SHA-")}
        return {"algorithm": algorithm}

    def _rsa_padding(self, algorithm: str):
        return _PSS if algorithm == "RSASSA-PSS" else _PKCS1V15

    def sign_standard(self, data: bytes, algorithm: str) -> bytes:
        if self.is_rsa:
            return self._key.sign(data, self._rsa_padding(algorithm), _SHA256)
        return self._sign_native(data)

    def verify_standard(self, data: bytes, sig: bytes, algorithm: str) -> bool:
        try:
            if self.is_rsa:
                self._pub.verify(sig, data, self._rsa_padding(algorithm), _SHA256)
            else:
                self._verify_native(sig, data)
            return True
        except (InvalidSignature, ValueError):
            return False
