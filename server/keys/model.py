"""Domain types: key stores, keys and their versions."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server.timeutil import to_api


class KeyType(str, enum.Enum):
    SECRET = "SECRET"
    SYMMETRIC_KEY = "SYMMETRIC_KEY"
    ASYMMETRIC_KEY = "ASYMMETRIC_KEY"


class KeyStatus(str, enum.Enum):
    ACTIVE = "ACTIVE"
    SCHEDULED_DELETION = "SCHEDULED_DELETION"


class AuthMode(str, enum.Enum):
    AND = "AND"
    OR = "OR"


class MacMode(str, enum.Enum):
    HEADER = "header"
    ATTESTED = "attested"
    NEIGHBOR = "neighbor"


SYMMETRIC_SPECS = ("AES-256-GCM",)
ASYMMETRIC_SPECS = ("RSA-2048", "RSA-3072", "RSA-4096", "EC-P256", "EC-P384", "ED25519")
DEFAULT_SPEC = {KeyType.SECRET: "SECRET", KeyType.SYMMETRIC_KEY: "AES-256-GCM", KeyType.ASYMMETRIC_KEY: "RSA-2048"}
SPECS = {KeyType.SECRET: ("SECRET",), KeyType.SYMMETRIC_KEY: SYMMETRIC_SPECS, KeyType.ASYMMETRIC_KEY: ASYMMETRIC_SPECS}

MAX_SECRET_BYTES = 32 * 1024
MAX_NAME = 100
MAX_DESCRIPTION = 1000


def yn(flag: bool) -> str:
    return "Y" if flag else "N"


@dataclass
class Project:
    id: int
    appkey: str
    name: str
    description: str = ""
    created_at: str | None = None

    @property
    def created_at_api(self) -> str | None:
        return to_api(self.created_at)


@dataclass
class KeyStore:
    id: int
    project_id: int
    name: str
    description: str
    ip4_auth: bool
    mac_auth: bool
    cert_auth: bool
    auth_mode: AuthMode
    mac_mode: MacMode
    approval_required: bool
    approvals_needed: int
    created_by: str
    created_at: str
    updated_by: str
    updated_at: str
    # False when the row fails its seal (server/access/seal.py): edited outside the key server.
    intact: bool = True

    @classmethod
    def from_row(cls, r: dict) -> "KeyStore":
        return cls(
            id=r["id"], project_id=r["project_id"], name=r["name"], description=r["description"],
            ip4_auth=bool(r["ip4_auth"]), mac_auth=bool(r["mac_auth"]), cert_auth=bool(r["cert_auth"]),
            auth_mode=AuthMode(r["auth_mode"]), mac_mode=MacMode(r["mac_mode"]),
            approval_required=bool(r["approval_required"]), approvals_needed=r["approvals_needed"],
            created_by=r["created_by"], created_at=r["created_at"],
            updated_by=r["updated_by"], updated_at=r["updated_at"],
        )

    def to_api(self) -> dict:
        """NHN key store object (§1.1) plus this project's extensions."""
        return {
            "keyStoreId": self.id, "name": self.name, "description": self.description,
            "ip4AuthUse": yn(self.ip4_auth), "macAuthUse": yn(self.mac_auth),
            "certificateAuthUse": yn(self.cert_auth), "authMode": self.auth_mode.value,
            "macVerification": self.mac_mode.value, "approvalRequired": self.approval_required,
            "approvalsNeeded": self.approvals_needed,
            "creationUser": self.created_by, "creationDatetime": to_api(self.created_at),
            "lastChangeUser": self.updated_by, "lastChangeDatetime": to_api(self.updated_at),
            **_integrity(self.intact),
        }


def _integrity(intact: bool) -> dict:
    # Only a row that fails its seal says so: every other answer stays NHN's shape.
    return {} if intact else {"integrity": "INVALID"}


@dataclass
class Key:
    id: str
    keystore_id: int
    name: str
    description: str
    key_type: KeyType
    key_spec: str
    status: KeyStatus
    exportable: bool
    imported: bool
    auto_rotation_days: int
    next_rotation_at: str | None
    current_version: int
    deletion_at: str | None
    last_access_at: str | None
    created_by: str
    created_at: str
    updated_by: str
    updated_at: str
    versions: list[dict] = field(default_factory=list)
    intact: bool = True               # as KeyStore.intact

    @classmethod
    def from_row(cls, r: dict) -> "Key":
        return cls(
            id=r["id"], keystore_id=r["keystore_id"], name=r["name"], description=r["description"],
            key_type=KeyType(r["key_type"]), key_spec=r["key_spec"], status=KeyStatus(r["status"]),
            exportable=bool(r["exportable"]), imported=bool(r["imported"]),
            auto_rotation_days=r["auto_rotation_days"], next_rotation_at=r["next_rotation_at"],
            current_version=r["current_version"], deletion_at=r["deletion_at"],
            last_access_at=r["last_access_at"], created_by=r["created_by"], created_at=r["created_at"],
            updated_by=r["updated_by"], updated_at=r["updated_at"],
        )

    @property
    def active(self) -> bool:
        return self.status is KeyStatus.ACTIVE

    def to_api(self) -> dict:
        """NHN key object (§1.2); `keyStatus`, `keySpec`, `exportable` are extensions."""
        d = {
            "keyId": self.id, "keyStoreId": self.keystore_id, "name": self.name,
            "description": self.description, "keyType": self.key_type.value,
            "keyStatus": self.status.value, "keySpec": self.key_spec, "exportable": self.exportable,
            "currentKeyValueVersion": self.current_version,
            "autoRotationPeriod": self.auto_rotation_days,
            "nextAutoRotationDate": to_api(self.next_rotation_at),
            "lastAccessDatetime": to_api(self.last_access_at),
            "deletionDatetime": to_api(self.deletion_at),
            "creationUser": self.created_by, "creationDatetime": to_api(self.created_at),
            "lastChangeUser": self.updated_by, "lastChangeDatetime": to_api(self.updated_at),
            **_integrity(self.intact),
        }
        if self.versions:
            d["versions"] = [
                {"keyVersion": v["version"], "status": v["status"], "creationDatetime": to_api(v["created_at"])}
                for v in self.versions
            ]
        return d
