"""Render templates: Jinja2, sandboxed, strict, with three functions that fetch key material.

    {{ secret("payments/db-password") }}     a SECRET's value
    {{ public_key("3f2a...e1") }}            an asymmetric key's public key, PEM (SPKI)
    {{ data_key("payments/file-key") }}      an exportable symmetric key's raw bytes, base64

A key is named by id or `store-name/key-name` (sidecar.keyref). The sandbox refuses attribute
access to Python internals; StrictUndefined makes a typo an error instead of an empty string.
A template error never reports a value: only its kind and the template line.
"""
from __future__ import annotations

import asyncio
import base64
import textwrap
import traceback
from typing import Awaitable, Callable

import jinja2
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from server.errors import ConfigError
from sidecar.keyref import KeyRef, KeyUnavailable

MAX_KEYS = 64                    # distinct keys one template may use
MAX_OUTPUT = 1024 * 1024         # bytes a rendered file may hold

_ENV = SandboxedEnvironment(enable_async=True, undefined=StrictUndefined, autoescape=False,
                            keep_trailing_newline=True, auto_reload=False)

# kind -> (function name in templates) ; a Lookup fetches (value, version) for (kind, ref)
KINDS = ("secret", "public_key", "data_key")
Lookup = Callable[[str, KeyRef], Awaitable[tuple[str, str, int | None]]]   # -> (key id, text, version)


class TemplateFailed(Exception):
    """Rendering failed; `definitive` when a key was refused/missing (the key server's word)."""

    def __init__(self, message: str, *, definitive: bool = False) -> None:
        super().__init__(message)
        self.definitive = definitive


def compile_template(text: str, where: str = "template") -> jinja2.Template:
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: template syntax error on line {e.lineno}: {e.message}") from None


def pem_public_key(encoded_b64: str) -> str:
    """The SPKI DER the key server returns (base64) as a PEM block."""
    body = "\n".join(textwrap.wrap(base64.b64encode(base64.b64decode(encoded_b64)).decode(), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


def data_key_b64(hex_literals: str) -> str:
    """NHN's export format for a symmetric key ("0x98, 0xa5, ...") as base64 of the raw bytes."""
    raw = bytes(int(b.strip(), 16) for b in hex_literals.split(","))
    if len(raw) not in (16, 24, 32):
        raise ValueError("not an AES key")
    return base64.b64encode(raw).decode()


class Rendering:
    """One render of one template: each key fetched once, the (key id, version) pairs it used recorded."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.used: dict[str, tuple[str, int | None]] = {}      # ref text -> (key id, version)
        self._memo: dict[tuple[str, str], asyncio.Future] = {}
        self.refused: KeyUnavailable | None = None

    def _fn(self, kind: str):
        async def fetch(ref_text=None) -> str:
            try:
                ref = KeyRef.parse(ref_text)
            except ValueError as e:
                raise TemplateFailed(f"{kind}(): {e}", definitive=True) from None
            memo = (kind, ref.text)
            if memo not in self._memo:
                if len(self._memo) >= MAX_KEYS:
                    raise TemplateFailed(f"a template may use at most {MAX_KEYS} keys", definitive=True)
                self._memo[memo] = asyncio.ensure_future(self.lookup(kind, ref))
            try:
                key_id, text, version = await asyncio.shield(self._memo[memo])
            except KeyUnavailable as e:
                self.refused = e
                raise
            self.used[ref.text] = (key_id, version)
            return text
        fetch.__name__ = kind
        return fetch

    async def render(self, template: jinja2.Template) -> str:
        try:
            out = await template.render_async({k: self._fn(k) for k in KINDS})
        except KeyUnavailable as e:
            raise TemplateFailed(str(e), definitive=e.definitive) from None
        except TemplateFailed:
            raise
        except Exception as e:            # jinja's own and the template's; the message may hold a value
            raise TemplateFailed(f"template error ({type(e).__name__}) on line {_template_line(e) or '?'}",
                                 definitive=True) from None
        finally:
            for fut in self._memo.values():
                if not fut.done():
                    fut.cancel()
        if len(out.encode()) > MAX_OUTPUT:
            raise TemplateFailed(f"the rendered file would be larger than {MAX_OUTPUT} bytes", definitive=True)
        return out


def _template_line(e: BaseException) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_filename == "<template>":
            line = lineno
    return line
