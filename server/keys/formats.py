"""The fixed client-API wire formats. One place owns each of them.

* ciphertext: base64(version uint32be || 12-byte nonce || AES-256-GCM ct || tag),
  AAD = key id and version.
* legacy signature: base64(version uint32be || signature).
"""
from __future__ import annotations

import base64
import binascii
import struct

from server.errors import InvalidUserData

_VER = struct.Struct(">I")
NONCE = 12
TAG = 16


def b64decode_strict(text: str, what: str = "value") -> bytes:
    """Standard base64 with padding; anything else is the caller's error."""
    if not isinstance(text, str):
        raise InvalidUserData(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidUserData(f"{what} is not valid base64") from None
    # Canonical only: no stray bits in the last character, no missing padding.
    if base64.b64encode(raw).decode("ascii") != text:
        raise InvalidUserData(f"{what} is not canonical base64 (standard alphabet, padded, unused bits zero)")
    return raw


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cipher_aad(key_id: str, version: int) -> bytes:
    return key_id.encode("ascii") + _VER.pack(version)


def pack_ciphertext(version: int, nonce: bytes, sealed: bytes) -> str:
    return b64(_VER.pack(version) + nonce + sealed)


def unpack_ciphertext(text: str) -> tuple[int, bytes, bytes]:
    raw = b64decode_strict(text, "ciphertext")
    if len(raw) < _VER.size + NONCE + TAG:
        raise InvalidUserData("ciphertext is too short")
    (version,) = _VER.unpack_from(raw)
    return version, raw[4:4 + NONCE], raw[4 + NONCE:]


def pack_signature(version: int, signature: bytes) -> str:
    return b64(_VER.pack(version) + signature)


def unpack_signature(text: str) -> tuple[int, bytes]:
    raw = b64decode_strict(text, "signature")
    if len(raw) <= _VER.size:
        raise InvalidUserData("signature is too short")
    (version,) = _VER.unpack_from(raw)
    return version, raw[4:]


def hex_literals(data: bytes) -> str:
    """NHN's `0xNN, 0xNN, ...` rendering of raw key bytes."""
    return ", ".join(f"0x{b:02x}" for b in data)
