"""A private SoftHSM2 for the test session.

SoftHSM2 reads SOFTHSM2_CONF when the PKCS#11 library initialises and sees only the
tokens present then, so the conf is set once for the session (before the module is
loaded) and the library is re-initialised after each new token.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from server.settings import RootKeyConfig

__all__ = ["MODULE", "SoftHSM", "Token", "softhsm"]

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = "so-pin-0000"


@dataclass(frozen=True)
class Token:
    label: str
    pin: str


@dataclass
class SoftHSM:
    dir: Path
    conf: Path
    module: str = MODULE

    def _reinit(self) -> None:
        import pkcs11

        from server.barrier.pkcs11 import _P11_LOCK
        with _P11_LOCK:
            loaded = pkcs11._loaded.get(self.module)
            if loaded is not None:
                loaded.reinitialize()

    def new_token(self, pin: str = "1234-5678") -> Token:
        label = "t-" + uuid.uuid4().hex[:12]
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
                        "--pin", pin], check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)})
        self._reinit()
        return Token(label, pin)

    def config(self, token: Token, key_label: str = "skm-root", **kw: Any) -> RootKeyConfig:
        base = {"provider": "pkcs11", "module": self.module, "token_label": token.label, "key_label": key_label,
                "pin_env": "SKM_TEST_PKCS11_PIN"}
        return RootKeyConfig(**{**base, **kw})

    def _session(self, token: Token, rw: bool = False):
        import pkcs11
        from pkcs11 import exceptions as p11e
        tok = pkcs11.lib(self.module).get_token(token_label=token.label)
        try:
            return tok.open(rw=rw, user_pin=token.pin)
        except p11e.UserAlreadyLoggedIn:  # a provider of this process is logged in
            return tok.open(rw=rw)

    def import_aes_key(self, token: Token, label: str, value: bytes) -> None:
        """Test only: put a known AES key in the token (non-extractable) to check wire interop."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        from server.barrier.pkcs11 import _P11_LOCK
        with _P11_LOCK:
            s = self._session(token, rw=True)
            try:
                s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                 Attribute.VALUE: value, Attribute.LABEL: label, Attribute.TOKEN: True,
                                 Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                 Attribute.ENCRYPT: True, Attribute.DECRYPT: True})
            finally:
                s.close()

    def inspect_key(self, token: Token, label: str) -> dict[str, Any]:
        """Attributes of a key plus what happens on reading its value and wrapping it out."""
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
        from pkcs11 import exceptions as p11e

        from server.barrier.pkcs11 import _P11_LOCK
        with _P11_LOCK:
            s = self._session(token, rw=True)
            try:
                key = s.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
                out: dict[str, Any] = {a.name: key[a] for a in (
                    Attribute.EXTRACTABLE, Attribute.SENSITIVE, Attribute.TOKEN, Attribute.NEVER_EXTRACTABLE,
                    Attribute.ALWAYS_SENSITIVE, Attribute.PRIVATE, Attribute.VALUE_LEN)}
                try:
                    key[Attribute.VALUE]
                    out["read_value"] = "READ"
                except p11e.PKCS11Error as e:
                    out["read_value"] = type(e).__name__
                wrapper = s.generate_key(KeyType.AES, 256, store=False)
                try:
                    wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)
                    out["wrap_out"] = "WRAPPED"
                except p11e.PKCS11Error as e:
                    out["wrap_out"] = type(e).__name__
                return out
            finally:
                s.close()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    if shutil.which("softhsm2-util") is None or not os.path.exists(MODULE):
        pytest.skip(reason="apt-get install softhsm2")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield SoftHSM(d, conf)
    finally:
        try:
            import pkcs11

            from server.barrier.pkcs11 import _P11_LOCK
            with _P11_LOCK:
                loaded = pkcs11._loaded.get(MODULE)
                if loaded is not None:
                    loaded.finalize()
        finally:
            if old is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = old
            shutil.rmtree(d, ignore_errors=True)
