"""Input and state checks the key service's parts share (each raises the client-facing error)."""
from __future__ import annotations

from server.errors import BarrierError, DataTooLarge, InvalidKeyStatus, InvalidKeyType, InvalidRequest
from server.keys.model import MAX_SECRET_BYTES, AuthMode, Key, KeyType, MacMode


def require_intact(key: Key) -> None:
    if not key.intact:
        raise BarrierError("this key's row was changed outside the key server, so it cannot be used; "
                           "restore the database from a backup (docs/disaster-recovery.md)")


def require_active(key: Key) -> None:
    """In service: not scheduled for deletion, and its row as the key server wrote it."""
    require_intact(key)
    if not key.active:
        raise InvalidKeyStatus("the key is scheduled for deletion; cancel the deletion to use it")


def require_type(key: Key, kt: KeyType) -> None:
    require_intact(key)           # its type may be what was edited: say that, not "wrong type"
    if key.key_type is not kt:
        raise InvalidKeyType(f"this operation needs a {kt.value} key; this key is a {key.key_type.value}")


def validate_rotation(days: int, min_days: int) -> int:
    if days is None:
        return 0
    if days != 0 and days < min_days:
        raise InvalidRequest(f"autoRotationPeriod must be 0 (off) or at least {min_days} days")
    if days > 3650:
        raise InvalidRequest("autoRotationPeriod must be at most 3650 days")
    return days


_HEX = frozenset("0123456789abcdef")


def is_key_id(s: str) -> bool:
    return len(s) == 32 and _HEX.issuperset(s)      # a set test, not a generator per character (hot path)


def key_type(v: KeyType | str) -> KeyType:
    try:
        return v if isinstance(v, KeyType) else KeyType(v)
    except ValueError:
        raise InvalidRequest("keyType must be SECRET, SYMMETRIC_KEY or ASYMMETRIC_KEY") from None


def auth_mode(v: str | AuthMode) -> AuthMode:
    if isinstance(v, AuthMode):
        return v
    try:
        return AuthMode(str(v).upper())
    except ValueError:
        raise InvalidRequest("authMode must be AND or OR") from None


def mac_mode(v: str | MacMode) -> MacMode:
    if isinstance(v, MacMode):
        return v
    try:
        return MacMode(str(v).lower())
    except ValueError:
        raise InvalidRequest("macVerification must be header, attested or neighbor") from None


def secret_bytes(value: str) -> bytes:
    if value == "":
        # An empty secret is always a mistake upstream (an unset variable, an empty pipe): refuse it.
        raise InvalidRequest("secretValue must not be empty")
    return text_bytes(value, "secretValue")


def text_bytes(value: str, what: str, limit: int = MAX_SECRET_BYTES) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} must be valid Unicode text") from None
    if len(data) > limit:
        raise DataTooLarge(f"{what} must be {limit} bytes or less (UTF-8)")
    return data


def limit(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise DataTooLarge(f"data must be {limit} bytes or less after base64 decoding")
