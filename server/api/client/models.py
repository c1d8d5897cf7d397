"""Request and response models of the NHN-compatible client API (field names verbatim)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from server.keys.model import MAX_SECRET_BYTES
from server.text import SafeText

# Character bounds are a first cut; the service checks the UTF-8 byte limits.
_TEXT = Field(max_length=MAX_SECRET_BYTES)
_SECRET = Field(min_length=1, max_length=MAX_SECRET_BYTES)   # an empty secret value is refused everywhere
_B64_64K = Field(max_length=(64 * 1024 * 4) // 3 + 4)


class _In(BaseModel):
    # Existing NHN clients send extra fields at times; ignore them, as NHN does.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)


class Confirm(BaseModel):
    clientIp: str
    clientMacHeader: Optional[str] = None
    clientSentCertificate: bool
    clientSentCerfificate: bool


class SecretOut(BaseModel):
    secret: str


class SecretUpdateIn(_In):
    secretValue: str = _SECRET


class SecretUpdateOut(BaseModel):
    keyId: str
    name: str
    description: str
    secretValue: str
    creationUser: str
    creationDatetime: Optional[str]
    lastChangeUser: str
    lastChangeDatetime: Optional[str]


class EncryptIn(_In):
    plaintext: str = _TEXT


class EncryptOut(BaseModel):
    ciphertext: str
    keyVersion: int


class DecryptIn(_In):
    ciphertext: str = Field(max_length=2 * MAX_SECRET_BYTES)


class DecryptOut(BaseModel):
    plaintext: str
    keyVersion: int


class LocalKeyOut(BaseModel):
    localKeyPlaintext: str
    localKeyCiphertext: str
    keyVersion: int


class SymmetricKeyOut(BaseModel):
    symmetricKey: str
    keyVersion: Optional[int] = None


class SignIn(_In):
    plaintext: str = Field(max_length=1024)


class SignOut(BaseModel):
    signature: str
    keyVersion: int


class VerifyIn(_In):
    plaintext: str = Field(max_length=1024)
    signature: str = Field(max_length=4096)


class VerifyOut(BaseModel):
    result: bool
    keyVersion: int


Algorithm = Literal["RSASSA-PSS", "RSASSA-PKCS1-v1_5", "ECDSA", "ED25519"]


class SignStandardIn(_In):
    plaintext: str = _B64_64K
    algorithm: Optional[Algorithm] = None


class SignStandardOut(BaseModel):
    signature: str
    algorithm: str
    hashAlgorithm: Optional[str] = None
    mgfAlgorithm: Optional[str] = None
    saltLength: Optional[int] = None
    keyVersion: int


class VerifyStandardIn(_In):
    plaintext: str = _B64_64K
    signature: str = Field(max_length=4096)
    algorithm: Optional[Algorithm] = None
    keyVersion: Optional[int] = Field(default=None, ge=0, le=2**31)


class KeyMaterialOut(BaseModel):
    keyType: str
    key: str
    encodedKey: str
    keyVersion: int


class KeyCreateIn(_In):
    keyStoreName: str = Field(min_length=1, max_length=100)
    name: SafeText = Field(min_length=1, max_length=100)
    description: SafeText = Field(default="", max_length=1000)


class SecretCreateIn(KeyCreateIn):
    secretValue: str = _SECRET


class CryptoKeyCreateIn(KeyCreateIn):
    autoRotationPeriod: int = Field(default=0, ge=0, le=3650)


class KeyCreateOut(BaseModel):
    keyId: str
    keyStatus: str


class KeyDeleteOut(BaseModel):
    keyId: str
    deletionDateTime: Optional[str]
