"""Request/response models of the management API (/api/v1)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from server.keys.model import MAX_SECRET_BYTES
from server.text import SafeText


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


YN = Literal["Y", "N"]
_INTEGRITY = ("present only when the row was changed outside the key server (it fails its seal): it is "
              "refused at every use until the database is restored")


class KeyStoreCreate(_In):
    name: SafeText = Field(min_length=1, max_length=100)
    description: SafeText = Field(default="", max_length=1000)
    ip4AuthUse: YN = "N"
    macAuthUse: YN = "N"
    certificateAuthUse: YN = "N"
    authMode: Literal["AND", "OR"] = "AND"
    macVerification: Literal["header", "attested", "neighbor"] = "attested"
    approvalRequired: bool = False
    approvalsNeeded: int = Field(default=1, ge=1, le=10)
    appkey: Optional[str] = Field(default=None, max_length=64)
    projectId: Optional[int] = Field(default=None, ge=1, le=10**12)


class KeyStoreUpdate(_In):
    name: Optional[SafeText] = Field(default=None, min_length=1, max_length=100)
    description: Optional[SafeText] = Field(default=None, max_length=1000)
    ip4AuthUse: Optional[YN] = None
    macAuthUse: Optional[YN] = None
    certificateAuthUse: Optional[YN] = None
    authMode: Optional[Literal["AND", "OR"]] = None
    macVerification: Optional[Literal["header", "attested", "neighbor"]] = None
    approvalRequired: Optional[bool] = None
    approvalsNeeded: Optional[int] = Field(default=None, ge=1, le=10)


class KeyStoreOut(BaseModel):
    keyStoreId: int
    name: str
    description: str
    ip4AuthUse: YN
    macAuthUse: YN
    certificateAuthUse: YN
    authMode: str
    macVerification: str
    approvalRequired: bool
    approvalsNeeded: int
    creationUser: str
    creationDatetime: Optional[str]
    lastChangeUser: str
    lastChangeDatetime: Optional[str]
    projectId: Optional[int] = None
    appkey: Optional[str] = Field(default=None, description="the project's appkey (in every client-API URL)")
    dataPlaneUrl: Optional[str] = Field(default=None, description="client-API base of the store's project "
                                        "(show only)")
    integrity: Optional[Literal["INVALID"]] = Field(default=None, description=_INTEGRITY)


class KeyStoreDeleted(BaseModel):
    keyStoreId: int
    name: str
    deleted: bool


class KeyStoreList(BaseModel):
    keyStoreList: list[KeyStoreOut]


class KeyCreate(_In):
    keyType: Literal["SECRET", "SYMMETRIC_KEY", "ASYMMETRIC_KEY"]
    name: SafeText = Field(min_length=1, max_length=100)
    description: SafeText = Field(default="", max_length=1000)
    keySpec: Optional[Literal["SECRET", "AES-256-GCM", "RSA-2048", "RSA-3072", "RSA-4096", "EC-P256", "EC-P384",
                              "ED25519"]] = None
    autoRotationPeriod: int = Field(default=0, ge=0, le=3650)
    exportable: bool = False
    secretValue: Optional[str] = Field(default=None, min_length=1, max_length=MAX_SECRET_BYTES)


class KeyUpdate(_In):
    description: Optional[SafeText] = Field(default=None, max_length=1000)
    autoRotationPeriod: Optional[int] = Field(default=None, ge=0, le=3650)


class KeyRotate(_In):
    secretValue: Optional[str] = Field(default=None, min_length=1, max_length=MAX_SECRET_BYTES)


class KeyVersionOut(BaseModel):
    keyVersion: int
    status: str
    creationDatetime: Optional[str]


class KeyOut(BaseModel):
    keyId: str
    keyStoreId: int
    name: str
    description: str
    keyType: str
    keyStatus: str
    keySpec: str
    exportable: bool
    currentKeyValueVersion: int
    autoRotationPeriod: int
    nextAutoRotationDate: Optional[str]
    lastAccessDatetime: Optional[str]
    deletionDatetime: Optional[str]
    creationUser: str
    creationDatetime: Optional[str]
    lastChangeUser: str
    lastChangeDatetime: Optional[str]
    versions: Optional[list[KeyVersionOut]] = None
    integrity: Optional[Literal["INVALID"]] = Field(default=None, description=_INTEGRITY)


class KeyList(BaseModel):
    keyList: list[KeyOut]


class DeletedOut(BaseModel):
    keyId: str
    deletionDateTime: Optional[str]


class AuthEntryIn(_In):
    value: str = Field(min_length=1, max_length=64)
    description: SafeText = Field(default="", max_length=1000)


class AuthRefIn(_In):
    value: str = Field(min_length=1, max_length=64)


class AuthEntryOut(BaseModel):
    value: str
    description: Optional[str] = None
    status: Optional[str] = None
    lastAccessDatetime: Optional[str] = None
    deletionDatetime: Optional[str] = None
    deletionDateTime: Optional[str] = None
    creationUser: Optional[str] = None
    creationDatetime: Optional[str] = None
    lastChangeUser: Optional[str] = None
    lastChangeDatetime: Optional[str] = None


class AuthEntryList(BaseModel):
    entries: list[AuthEntryOut]


class ProjectCreate(_In):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    description: str = Field(default="", max_length=1000)


class ProjectOut(BaseModel):
    id: int
    appkey: str
    name: str
    description: str = ""
    createdAt: Optional[str] = None
    dataPlaneUrl: Optional[str] = Field(default=None, description="client-API base of this project: from "
                                        "`public_url`, else the data listener's host and port")


class ProjectList(BaseModel):
    projects: list[ProjectOut]


class StatusOut(BaseModel):
    sealed: bool
    sealedReason: Optional[str] = None
    systemKeyVersion: Optional[int] = None
    systemKeyVersions: list[int]
    version: str
