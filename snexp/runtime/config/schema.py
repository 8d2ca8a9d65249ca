"""What a config tree allows: field types, comments and dotted keys, and typed values.

Config dataclasses are read by introspection: resolved type hints (:func:`_hints`), the
trailing ``# comment`` of each field (:func:`_comments`, shown by ``--help`` and written by
:func:`snexp.runtime.config.to_toml`), and the dotted keys of the leaves (``train.lr``).
:func:`_coerce`
checks a TOML value, or parses command-line text, against a field's type (``bool``, ``int``,
``float``, ``str``, ``Literal``, ``X | None``, ``tuple[X, ...]``, or a *text value* type: a
class with a ``parse(text)`` classmethod whose ``str()`` reads back, such as
:class:`snexp.NormSpec`, written to TOML as its text); a mistake raises
:class:`~snexp.runtime.config.ConfigError` naming the key, the value, what is allowed and the
closest
valid spellings. Helpers of the other ``snexp.runtime.config`` modules, not public API.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from snexp.runtime.config.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_NONE = "none"  # how None is spelled in TOML files and on the command line


# ----------------------------------------------------------------------------- introspection


def _is_config(tp: Any) -> bool:
    """A config section: a dataclass that is not itself a text value (NormSpec is a leaf)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and not _is_text_value(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> its ``metadata["help"]`` or the trailing ``# comment`` in the source."""
    out: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        lines = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        node, lines = None, {}
    if isinstance(node, ast.ClassDef):
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if stmt.end_lineno in lines:
                    out[stmt.target.id] = lines[stmt.end_lineno]
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            out[f.name] = str(f.metadata["help"])
    return out


def _leaf_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config tree -> its type."""
    keys: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        if _is_config(tp):
            keys.update(_leaf_keys(tp, f"{prefix}{name}."))
        else:
            keys[prefix + name] = tp
    return keys


def _lookup(cls: type, key: str, source: str) -> Any:
    """The type of the field at a dotted ``key``, or a ConfigError that suggests keys."""
    parts = key.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        if not _is_config(tp):
            head = ".".join(parts[:i])
            raise ConfigError(
                f"{source}: '{head}' is a value, not a section, so '{key}' does not exist"
            )
        hints = _hints(tp)
        if part not in hints:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest_key(cls, key)}")
        tp = hints[part]
    if _is_config(tp):
        first = next(iter(_leaf_keys(tp, key + ".")), key + ".<name>")
        raise ConfigError(
            f"{source}: '{key}' is a section; set its keys one by one, e.g. '{first}=...'"
        )
    return tp


def _suggest_key(cls: type, key: str) -> str:
    keys = list(_leaf_keys(cls))
    head, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
    close = [
        f"{head}.{m}" if head else m
        for m in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)
    ]
    close += [k for k in keys if k.rpartition(".")[2] == leaf and k not in close]
    close = close or difflib.get_close_matches(key, keys, n=2, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(f"'{k}'" for k in close[:3]) + "?"
    return " (--help lists every key)"


# ----------------------------------------------------------------------------- values


def _split_top_level(text: str) -> list[str]:
    """``"a, f(x=1, y=2)"`` -> ``["a", "f(x=1, y=2)"]``: commas inside brackets stay."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return items + [text[start:].strip()]


def _is_text_value(tp: Any) -> bool:
    """A class that reads from and prints as text (``tp.parse(str(v)) == v``), e.g. NormSpec."""
    return isinstance(tp, type) and callable(getattr(tp, "parse", None))


def _describe(tp: Any) -> str:
    if _is_text_value(tp):
        return f"a {tp.__name__} text"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or none"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _plural(tp: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(
        tp, f"values ({_describe(tp)})"
    )


def _shown(value: Any, text: bool) -> str:
    if text:
        return repr(value)
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)
    return f"{value!r} (a {kind})"


def _coerce(value: Any, tp: Any, key: str, source: str, text: bool) -> Any:
    """Check or parse ``value`` for a field of type ``tp``.

    ``text`` says the value is command-line text to parse; otherwise it is a TOML (or Python)
    value whose type must already fit.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> ConfigError:
        return ConfigError(f"{source}: {key} expects {_describe(tp)}, got {_shown(value, text)}")

    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"config field {key}: only 'X | None' unions are supported, not {tp}")
        if value is None or (isinstance(value, str) and value.strip().lower() == _NONE):
            return None
        if typing.get_origin(rest[0]) is Literal:
            return _coerce(value, rest[0], key, source, text)
        try:
            return _coerce(value, rest[0], key, source, text)
        except ConfigError:
            raise wrong() from None
    if origin is Literal:
        for choice in args:
            if value == choice or (text and str(choice) == value):
                return choice
        names = [str(a) for a in args]
        close = difflib.get_close_matches(str(value).lower(), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{source}: {value!r} is not a valid value for {key}; "
            f"choose from {', '.join(names)}{hint}"
        )
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"config field {key}: use tuple[X, ...], not {tp}")
        items = value
        if text and isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    items, text = tomllib.loads(f"v = {value}")["v"], False
                except tomllib.TOMLDecodeError:
                    raise wrong() from None
            else:
                items = _split_top_level(value) if value.strip() else []
        if not isinstance(items, (list, tuple)):
            raise wrong()
        return tuple(_coerce(v, args[0], f"{key}[{i}]", source, text) for i, v in enumerate(items))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            word = value.strip().lower()
            if word in ("true", "yes", "on", "1"):
                return True
            if word in ("false", "no", "off", "0"):
                return False
        raise wrong()
    if tp is int:
        if text and isinstance(value, str):
            if not value.isascii():  # int('١') is 1: other scripts' digits are a typo here
                raise wrong()
            try:
                return int(value.strip())
            except ValueError:
                raise wrong() from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if text and isinstance(value, str):
            if not value.isascii():
                raise wrong()
            try:
                return float(value.strip())
            except ValueError:
                raise wrong() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if _is_text_value(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, str):
            raise wrong()
        try:
            return tp.parse(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    raise TypeError(f"config field {key}: unsupported type {tp!r}")
