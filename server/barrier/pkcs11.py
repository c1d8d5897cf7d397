"""PKCS#11 root key: an AES-256 key inside a token (HSM, SoftHSM2) that never leaves it.

Wrap format is FileRootKey's: 12-byte nonce || AES-256-GCM ciphertext || tag with
AAD = wrap_aad(version), computed by the token (CKM_AES_GCM), so a keyring moves
between providers by re-wrapping only. Every PKCS#11 call runs in a worker thread.
"""
from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams

from server.barrier.rootkey import ROOT_KEY_BYTES, RootKeyProvider, WrongRootKey, wrap_aad
from server.errors import ConfigError, Unavailable
from server.settings import RootKeyConfig

T = TypeVar("T")

NONCE_BYTES = 12
TAG_BYTES = 16
GENERATE_HINT = "create it with `skm rootkey generate --provider pkcs11`"

# python-pkcs11 initialises the module without locking arguments: one call at a time.
_P11_LOCK = threading.RLock()

# Errors that mean "this ciphertext/AAD/key does not match", not "the token is gone".
_CRYPTO_FAILURES: tuple[type[Exception], ...] = (
    p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange,
    p11e.DataInvalid, p11e.DataLenRange, p11e.FunctionFailed,
)
_PIN_FAILURES: tuple[type[Exception], ...] = (
    p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinExpired,
)


def _read_pin(cfg: RootKeyConfig) -> tuple[str, str]:
    """(pin, where it came from) from cfg.pin_file (0600) or the env var cfg.pin_env."""
    if cfg.pin_file:
        path = Path(cfg.pin_file)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"PKCS#11 PIN file {path} does not exist; check rootkey.pin_file") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"PKCS#11 PIN file {path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"PKCS#11 PIN file {path} is readable by group or others; run `chmod 600 {path}`")
        pin = path.read_text().strip()
        where = f"PIN file {path}"
    else:
        name = cfg.pin_env or "SKM_PKCS11_PIN"
        pin = os.environ.get(name, "").strip()
        where = f"environment variable {name}"
    if not pin:
        raise ConfigError(f"no PKCS#11 PIN: set the {where}" if not cfg.pin_file else f"the PKCS#11 {where} is empty")
    return pin, where


class _Token:
    """A logged-in session and the root key handle; only used under _P11_LOCK in a thread."""

    def __init__(self, cfg: RootKeyConfig, pin: str, pin_where: str) -> None:
        self.cfg = cfg
        self._pin = pin
        self._pin_where = pin_where
        self.session: Any = None
        self.key: Any = None

    def _lib(self) -> Any:
        try:
            return pkcs11.lib(self.cfg.module)
        except p11e.PKCS11Error:
            raise ConfigError(f"cannot load the PKCS#11 module {self.cfg.module}; check rootkey.module") from None

    def _token(self) -> Any:
        label = self.cfg.token_label
        try:
            return self._lib().get_token(token_label=label)
        except p11e.NoSuchToken:
            raise ConfigError(f"no PKCS#11 token labelled {label!r} in {self.cfg.module}; check rootkey.token_label "
                              "(`softhsm2-util --show-slots` lists SoftHSM2 tokens)") from None
        except p11e.MultipleTokensReturned:
            raise ConfigError(f"more than one PKCS#11 token is labelled {label!r}; give the root-key token "
                              "a unique label") from None

    def open_session(self, rw: bool = False) -> None:
        self.close()
        token = self._token()
        label = self.cfg.token_label
        try:
            self.session = token.open(rw=rw, user_pin=self._pin)
        except p11e.UserAlreadyLoggedIn:
            # Another session of this process is logged in; login state is per application.
            self.session = token.open(rw=rw)
        except _PIN_FAILURES:
            raise ConfigError(f"the PIN for PKCS#11 token {label!r} was refused; check the {self._pin_where}") from None
        except p11e.PinLocked:
            raise ConfigError(f"the user PIN of PKCS#11 token {label!r} is locked; reset it with the token's "
                              "security officer") from None
        except p11e.UserPinNotInitialized:
            raise ConfigError(f"PKCS#11 token {label!r} has no user PIN; initialise the token first") from None

    def find_key(self) -> None:
        label = self.cfg.key_label
        try:
            key = self.session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=label)
        except p11e.NoSuchKey:
            raise ConfigError(f"no AES key labelled {label!r} on PKCS#11 token {self.cfg.token_label!r}; "
                              f"{GENERATE_HINT}") from None
        except p11e.MultipleObjectsReturned:
            raise ConfigError(f"more than one AES key is labelled {label!r} on PKCS#11 token "
                              f"{self.cfg.token_label!r}; the root key's label must be unique") from None
        if key[Attribute.VALUE_LEN] != ROOT_KEY_BYTES:
            raise ConfigError(f"PKCS#11 key {label!r} is not an AES-256 key; {GENERATE_HINT}")
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise ConfigError(f"PKCS#11 key {label!r} is extractable or not sensitive; a root key must never "
                              f"leave the token: {GENERATE_HINT}")
        self.key = key

    def connect(self, rw: bool = False) -> None:
        """Log in and find the key; token trouble other than configuration is Unavailable."""
        try:
            self.open_session(rw)
            if not rw:
                self.find_key()
        except p11e.PKCS11Error as e:
            self.close()
            raise Unavailable(f"the PKCS#11 token {self.cfg.token_label!r} failed ({type(e).__name__})") from None
        except ConfigError:
            self.close()
            raise

    def close(self) -> None:
        session, self.session, self.key = self.session, None, None
        if session is None:
            return
        try:
            session.close()  # C_Logout too when this session logged in
        except p11e.PKCS11Error:
            pass

    def call(self, op: Callable[[Any], T]) -> T:
        """Run op(key); reconnect once when the session went away (logout, token re-init)."""
        with _P11_LOCK:
            for attempt in (1, 2):
                if self.key is None:
                    self.connect()
                try:
                    return op(self.key)
                except _CRYPTO_FAILURES:
                    raise
                except p11e.PKCS11Error as e:
                    self.close()
                    if attempt == 2:
                        raise Unavailable(f"the PKCS#11 token {self.cfg.token_label!r} failed "
                                          f"({type(e).__name__})") from None
            raise AssertionError("unreachable")


class PKCS11RootKey(RootKeyProvider):
    name = "pkcs11"

    def __init__(self, cfg: RootKeyConfig, pin: str, pin_where: str) -> None:
        self.cfg = cfg
        self._token = _Token(cfg, pin, pin_where)

    def __repr__(self) -> str:
        return f"PKCS11RootKey(module={self.cfg.module!r}, token={self.cfg.token_label!r}, key={self.cfg.key_label!r})"

    @classmethod
    def from_config(cls, cfg: RootKeyConfig) -> "PKCS11RootKey":
        """Check the settings and read the PIN; the token is opened on first use (or open())."""
        if not Path(cfg.module).is_file():
            raise ConfigError(f"PKCS#11 module {cfg.module} does not exist; check rootkey.module "
                              "(SoftHSM2: apt-get install softhsm2)")
        if not cfg.token_label or not cfg.key_label:
            raise ConfigError("rootkey.token_label and rootkey.key_label must be set for the pkcs11 provider")
        pin, where = _read_pin(cfg)
        return cls(cfg, pin, where)

    async def open(self) -> None:
        """Log in and find the key now: a wrong PIN or a missing token/key fails here, at start."""
        def _open() -> None:
            with _P11_LOCK:
                self._token.connect()
        await asyncio.to_thread(_open)

    async def wrap(self, system_key: bytes, version: int) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        params = GCMParams(nonce, wrap_aad(version), TAG_BYTES * 8)
        ct = await asyncio.to_thread(
            self._token.call, lambda k: k.encrypt(system_key, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        return nonce + bytes(ct)

    async def unwrap(self, wrapped: bytes, version: int) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise self._wrong(version)
        params = GCMParams(wrapped[:NONCE_BYTES], wrap_aad(version), TAG_BYTES * 8)
        body = wrapped[NONCE_BYTES:]
        try:
            out = await asyncio.to_thread(
                self._token.call, lambda k: k.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        except _CRYPTO_FAILURES:
            raise self._wrong(version) from None
        return bytes(out)

    def _wrong(self, version: int) -> WrongRootKey:
        return WrongRootKey(f"the PKCS#11 root key {self.cfg.key_label!r} on token {self.cfg.token_label!r} does "
                            f"not unwrap system-key version {version}; is this the root key the keyring was "
                            "wrapped with?")

    async def close(self) -> None:
        def _close() -> None:
            with _P11_LOCK:
                self._token.close()
        await asyncio.to_thread(_close)


async def generate_root_key(cfg: RootKeyConfig) -> None:
    """Create the AES-256 root key in the token: non-extractable, sensitive, persistent.

    Refuses when any object with cfg.key_label already exists on the token.
    """
    if not Path(cfg.module).is_file():
        raise ConfigError(f"PKCS#11 module {cfg.module} does not exist; check rootkey.module")
    pin, where = _read_pin(cfg)

    def _generate() -> None:
        tok = _Token(cfg, pin, where)
        with _P11_LOCK:
            try:
                tok.connect(rw=True)
                existing = list(tok.session.get_objects({Attribute.LABEL: cfg.key_label}))
                if existing:
                    raise ConfigError(f"PKCS#11 token {cfg.token_label!r} already holds an object labelled "
                                      f"{cfg.key_label!r}; refusing to create another root key with that label")
                tok.session.generate_key(
                    KeyType.AES, ROOT_KEY_BYTES * 8, label=cfg.key_label, store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.SIGN: False,
                        Attribute.VERIFY: False,
                        Attribute.DERIVE: False,
                    })
            except p11e.PKCS11Error as e:
                raise ConfigError(f"creating the root key on PKCS#11 token {cfg.token_label!r} failed "
                                  f"({type(e).__name__})") from None
            finally:
                tok.close()

    await asyncio.to_thread(_generate)
