"""The TOML writer: a config as a commented TOML file that :func:`load_config` reads back.

``tomllib`` reads TOML but does not write it; configs need only scalars, arrays of scalars
and tables, so :func:`to_toml` writes them itself, each key followed by its field comment.
``None`` is written ``"none"``, the spelling the readers accept; a text value (a class with
``parse``, such as ``NormSpec``) is written as its text.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from snexp.runtime.config.schema import _NONE, _comments, _is_config, _is_text_value

__all__ = ["to_toml"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if value is None:
        return _toml_str(_NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # 0.1, 1e-05, inf, -inf: all valid TOML floats
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if _is_text_value(type(value)):
        return _toml_str(str(value))
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def to_toml(config: Any, *, header: str | None = None) -> str:
    """The config as TOML, each key with its field comment; :func:`load_config` reads it back.

    Args:
        config: A config dataclass instance.
        header: Optional text put at the top as ``#`` comment lines.

    Returns:
        TOML text: top-level keys first, then one ``[table]`` per section.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []

    def emit(node: Any, path: list[str]) -> None:
        comments = _comments(type(node))
        scalars, sections = [], []
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if _is_config(type(value)):
                sections.append((f.name, value))
            else:
                text = f"{_toml_key(f.name)} = {_toml_value(value)}"
                note = comments.get(f.name)
                scalars.append(f"{text}  # {note}" if note else text)
        if scalars:
            if path:
                lines.extend(["", "[" + ".".join(_toml_key(p) for p in path) + "]"])
            lines.extend(scalars)
        for name, value in sections:
            emit(value, path + [name])

    emit(config, [])
    return "\n".join(lines).lstrip("\n") + "\n"
