"""Stored text (names, descriptions, comments): what it may hold, and how a terminal shows it.

Names and descriptions end up in terminals (`skm key list`), logs, audit exports and
the console. A control character there is an attack on whoever reads them: an ANSI
escape rewrites the screen, a newline forges a table row, a NUL truncates, and a
bidirectional override (U+202E) makes `gpj.exe` look like `exe.jpg`. So:

* refused on input (400 `Invalid Request`), in names AND descriptions alike: every
  control character (Unicode category Cc: C0 including tab and newline, DEL, C1),
  the bidirectional controls (U+202A-202E embeddings/overrides, U+2066-2069
  isolates, U+200E/U+200F/U+061C marks: invisible, and a name has no need of
  them), the line and paragraph separators U+2028/U+2029, and lone surrogates.
  Descriptions are one line (the console's fields are one-line inputs), so
  newlines and tabs are refused there too. Ordinary non-Latin text, emoji and
  zero-width joiners stay allowed.
* shown escaped (`visible`) wherever the CLI prints stored text, since rows stored
  before this rule may still hold such characters.
"""
from __future__ import annotations

import unicodedata
from typing import Annotated, Any


BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
SEPARATORS = frozenset("\u2028\u2029")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def is_unsafe(ch: str) -> bool:
    return ch in BIDI_CONTROLS or ch in SEPARATORS or unicodedata.category(ch) in ("Cc", "Cs")


def first_unsafe(value: str) -> str | None:
    for ch in value:
        if is_unsafe(ch):
            return ch
    return None


def _message(field: str, ch: str) -> str:
    return (f"{field} contains U+{ord(ch):04X} ({_label(ch)}); names, descriptions and comments may not hold "
            "control characters (newline, tab, escape, NUL) or bidirectional-text controls")


def _label(ch: str) -> str:
    if ch in BIDI_CONTROLS:
        return "a bidirectional-text control"
    if ch in SEPARATORS:
        return "a line separator"
    if unicodedata.category(ch) == "Cs":
        return "a lone surrogate"
    return "a control character"


def check(value: Any, field: str) -> Any:
    """`value` unchanged when it is safe stored text (or not text at all); else InvalidRequest naming `field`."""
    if isinstance(value, str):
        ch = first_unsafe(value)
        if ch is not None:
            from server.errors import InvalidRequest
            raise InvalidRequest(_message(field, ch))
    return value


def _pydantic_check(value: str) -> str:
    ch = first_unsafe(value)
    if ch is not None:
        raise ValueError(_message("the text", ch))
    return value


def __getattr__(name: str) -> Any:
    # A request-model field of stored text: `name: SafeText = Field(min_length=1, max_length=100)`.
    # Made on first import of the name: the CLI escapes output with this module and need not load
    # pydantic (50 ms) for it.
    if name == "SafeText":
        from pydantic import AfterValidator
        value = globals()["SafeText"] = Annotated[str, AfterValidator(_pydantic_check)]
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Change parameters (server/access/changes.py) that are stored text.
TEXT_PARAMS = ("name", "description")


def check_params(params: dict) -> None:
    """The stored-text parameters of a change, checked before it is applied or held for approval."""
    for k in TEXT_PARAMS:
        check(params.get(k), k)
    changes = params.get("changes")
    if isinstance(changes, dict):
        check_params(changes)


def visible(value: Any) -> str:
    """`value` as text a terminal shows as it is: each unsafe character becomes an escape
    (`\\n`, `\\x1b`, `\\u202e`), everything else is left alone."""
    text = "" if value is None else str(value)
    if first_unsafe(text) is None:
        return text
    out = []
    for ch in text:
        if not is_unsafe(ch):
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def storable(value: str) -> str:
    """`value` with what neither UTF-8 nor PostgreSQL's text can hold written as a backslash escape: NUL as
    `\\x00`, a byte that is not UTF-8 as `\\xff` (aiohttp keeps such a header byte as a lone surrogate, so a
    client chooses it), any other lone surrogate as `\\ud800`; anything else is kept as it is. For text taken
    from a request that is recorded or echoed: such a value failed the audit batch it joined (503 for every
    request waiting on it, audit being fail-closed) and a response that echoed it (500)."""
    if "\x00" not in value and (value.isascii() or _encodes(value)):
        return value
    value = value.replace("\x00", "\\x00")
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()


def _encodes(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
