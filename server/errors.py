"""One error hierarchy for every process.

Each class carries its HTTP status, the envelope ``resultCode`` and the NHN
``resultMessage``. Handlers raise; one middleware renders the envelope.
Messages never carry secret values: ``detail`` is for operator-facing hints
(what to do), never for user data.
"""
from __future__ import annotations


class SKMError(Exception):
    status: int = 400
    result_code: int = -1
    message: str = "Invalid Request"

    def __init__(self, detail: str | None = None, *, message: str | None = None) -> None:
        self.detail = detail
        if message is not None:
            self.message = message
        super().__init__(self.message if detail is None else f"{self.message}: {detail}")

    def envelope(self) -> dict:
        header = {
            "resultCode": self.result_code,
            "resultMessage": self.message,
            "isSuccessful": False,
        }
        if self.detail:
            header["resultDetail"] = self.detail
        return {"header": header, "body": None}


# --- request shape -----------------------------------------------------------
class InvalidRequest(SKMError):
    status, result_code, message = 400, -1001, "Invalid Request"


class InvalidJSON(SKMError):
    status, result_code, message = 400, -1002, "Invalid JSON"


class UnsupportedMediaType(SKMError):
    status, result_code, message = 415, -1003, "Unsupported Content Type"


class PayloadTooLarge(SKMError):
    status, result_code, message = 413, -1004, "Request Too Large"


class RequestTimeout(SKMError):
    status, result_code, message = 408, -1007, "Request Timeout"


class URLNotFound(SKMError):
    status, result_code, message = 404, -1005, "URL NOT FOUND"


class MethodNotAllowed(SKMError):
    status, result_code, message = 405, -1006, "Method Not Allowed"


class InvalidUserData(SKMError):
    """Bad ciphertext, signature or base64 from the caller (NHN message)."""
    status, result_code, message = 400, -1100, "Invalid User Data"


class DataTooLarge(SKMError):
    status, result_code, message = 400, -1101, "Data Too Large"


# --- callers ---------------------------------------------------------------
class InvalidAppkey(SKMError):
    status, result_code, message = 401, -1200, "Invalid Appkey"


class Unauthenticated(SKMError):
    status, result_code, message = 401, -1201, "Authentication Required"


class Forbidden(SKMError):
    status, result_code, message = 403, -1202, "Forbidden"


class IPv4AuthFailure(SKMError):
    status, result_code, message = 403, -1210, "IPv4 Auth Failure"


class MACAuthFailure(SKMError):
    status, result_code, message = 403, -1211, "MAC Auth Failure"


class CertificateAuthFailure(SKMError):
    status, result_code, message = 403, -1212, "Certificate Auth Failure"


class TooManyAttempts(SKMError):
    status, result_code, message = 429, -1220, "Too Many Attempts"


# --- keys ------------------------------------------------------------------
class InvalidKeyId(SKMError):
    status, result_code, message = 404, -1300, "Invalid Key Id"


class InvalidKeyStatus(SKMError):
    status, result_code, message = 409, -1301, "Invalid Key Status"


class InvalidKeyVersion(SKMError):
    status, result_code, message = 400, -1302, "Invalid Key Version"


class InvalidKeyVersionStatus(SKMError):
    status, result_code, message = 409, -1303, "Invalid Key Version Status"


class InvalidKeyType(SKMError):
    status, result_code, message = 400, -1304, "Invalid Key Type"


class ExportNotAllowed(SKMError):
    status, result_code, message = 403, -1305, "Key Export Not Allowed"


class KeyStoreNotFound(SKMError):
    status, result_code, message = 404, -1310, "Invalid Key Store"


class Conflict(SKMError):
    status, result_code, message = 409, -1320, "Conflict"


class NotFound(SKMError):
    status, result_code, message = 404, -1321, "Not Found"


class ApprovalUnavailable(Conflict):
    """Fail closed: a key store requires approval but nobody (or nothing) can approve the change."""
    status, result_code, message = 409, -1322, "Approval Unavailable"


class ApprovalRequired(SKMError):
    """Not a failure: the change became a change request awaiting approval."""
    status, result_code, message = 202, 1, "Approval Required"

    def __init__(self, request_id: int, detail: str | None = None) -> None:
        self.request_id = request_id
        super().__init__(detail or "the key store requires approval; the change waits as a change request")

    def envelope(self) -> dict:
        return {"header": {"resultCode": self.result_code, "resultMessage": self.message, "isSuccessful": True,
                           "resultDetail": self.detail},
                "body": {"changeRequestId": self.request_id, "status": "PENDING"}}


# --- server state ----------------------------------------------------------
class Sealed(SKMError):
    status, result_code, message = 503, -1500, "Sealed"


class Unavailable(SKMError):
    status, result_code, message = 503, -1501, "Service Unavailable"


class ConnectionFailed(Unavailable):
    """A client could not talk to a server (connect, TLS, an early close); the detail says what to change."""
    message = "connection failed"


class BarrierError(SKMError):
    """A stored record does not open under the system key: tampering or a wrong key."""
    status, result_code, message = 500, -1502, "Storage Integrity Failure"


class ConfigError(SKMError):
    status, result_code, message = 500, -1600, "Configuration Error"
