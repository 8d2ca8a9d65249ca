"""Layering settings into a config: defaults < TOML files < flags < ``KEY=VALUE``.

Each setting is a dotted key, a value and where it came from (a file, ``--set``, a flag), so
that messages can name the source. :func:`_resolve` checks every setting against the field's
type (:mod:`snexp.runtime.config.schema`), later settings winning, and builds the frozen dataclass
tree on top of the defaults (or of a given config, for :func:`override`).

Old keys: a config class may list keys it no longer has in ``LEGACY_KEYS`` (a ClassVar dict,
old name -> type) and fold them into its fields with a classmethod
``upgrade_legacy(fields, old) -> {field: value}``, so that ``config.toml`` files written before a
change still load (they are read, never written). The public
functions: :func:`resolve_config`, :func:`load_config`, :func:`override` and :func:`flatten`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from snexp.runtime.config.bounds import _check_range, _field_type
from snexp.runtime.config.errors import ConfigError
from snexp.runtime.config.schema import (
    _coerce,
    _describe,
    _hints,
    _is_config,
    _leaf_keys,
    _lookup,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["flatten", "load_config", "override", "resolve_config", "upgrade_flat"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Setting:
    key: str  # dotted key, e.g. "train.lr"
    value: Any  # a TOML/Python value, or command-line text when `text`
    source: str  # where it came from, for messages: a file, "--set", "--epochs"
    text: bool  # value is command-line text, parsed by the field's type


def _flat_items(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in data.items():
        if isinstance(v, Mapping):
            yield from _flat_items(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        siblings = sorted(p.name for p in folder.glob("*.toml")) if folder.is_dir() else []
        stems = {Path(name).stem: name for name in siblings}
        close = [stems[m] for m in difflib.get_close_matches(path.stem, stems, n=1, cutoff=0.6)]
        hint = (
            f"; did you mean '{path.parent / close[0]}'?"
            if close
            else f" (files there: {', '.join(siblings)})"
            if siblings
            else ""
        )
        what = "is a directory, not a config file" if path.is_dir() else "not found"
        raise ConfigError(f"config file '{path}' {what}{hint}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from None


def _file_settings(path: str | Path) -> list[_Setting]:
    return [_Setting(k, v, str(path), False) for k, v in _flat_items(_read_toml(path))]


def _set_setting(item: str) -> _Setting:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.1")
    key = key.strip()
    return _Setting(key, value.strip(), f"--set {key}={value.strip()}", True)


def _build(cls: type[T], values: Mapping[str, Any], prefix: str, default: Any) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, _hints(cls)[f.name]
        if _is_config(tp):
            sub = getattr(default, f.name) if default is not None else _field_default(f)
            kwargs[f.name] = _build(tp, values, key + ".", sub)
        elif key in values:
            kwargs[f.name] = values[key]
        elif default is not None:
            kwargs[f.name] = getattr(default, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}' ({_describe(tp)})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        section = f"[{prefix[:-1]}]" if prefix else "the config"
        raise ConfigError(f"invalid value in {section}: {exc}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _section(cls: type, prefix: str) -> type | None:
    """The config class at a dotted section prefix (``""`` is the root), or None."""
    tp: Any = cls
    for part in filter(None, prefix.split(".")):
        tp = _hints(tp).get(part) if _is_config(tp) else None
    return tp if _is_config(tp) else None


def _legacy_type(cls: type, key: str) -> Any:
    """The type of ``key`` when it names an old key its section still reads, else None."""
    prefix, _, leaf = key.rpartition(".")
    owner = _section(cls, prefix)
    legacy = getattr(owner, "LEGACY_KEYS", None) or {}
    if owner is None or leaf in _hints(owner) or leaf not in legacy:
        return None
    return legacy[leaf]


def _section_fields(cls: type, prefix: str, values: Mapping[str, Any], base: Any) -> dict:
    """The section's current field values: set ones, else the base config's, else defaults."""
    node = base
    for part in filter(None, prefix.split(".")):
        node = getattr(node, part, None) if node is not None else None
    owner = _section(cls, prefix)
    out = {}
    for f in dataclasses.fields(owner):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out[f.name] = (values[key] if key in values else
                       getattr(node, f.name) if node is not None else _field_default(f))
    return out


def _resolve(cls: type[T], settings: Sequence[_Setting], base: Any = None) -> T:
    values: dict[str, Any] = {}
    legacy: dict[str, dict[str, Any]] = {}  # section prefix -> old key -> value
    for s in settings:
        old_tp = _legacy_type(cls, s.key)
        if old_tp is not None:
            prefix, _, leaf = s.key.rpartition(".")
            legacy.setdefault(prefix, {})[leaf] = _coerce(s.value, old_tp, s.key, s.source,
                                                          s.text)
            continue
        tp = _lookup(cls, s.key, s.source)
        values[s.key] = _coerce(s.value, tp, s.key, s.source, s.text)
        _check_range(values[s.key], _field_type(cls, s.key), s.key, s.source)
    for prefix, old in legacy.items():
        owner = _section(cls, prefix)
        fields = _section_fields(cls, prefix, values, base)
        keys = ", ".join(f"{prefix}.{k}" if prefix else k for k in old)
        try:
            new = owner.upgrade_legacy(fields, old)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"old key(s) {keys}: {exc}") from None
        for name, value in new.items():
            values[f"{prefix}.{name}" if prefix else name] = value
    return _build(cls, values, "", base)


def upgrade_flat(cls: type, flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config saved by an older version (a checkpoint's ``config``) as read today: the
    old keys that sections list in ``LEGACY_KEYS`` are folded into their fields as when a file
    is read, and those sections' saved keys come back as today's values (e.g. a ``NormSpec``).
    Other keys, and a saved config that does not resolve, are returned as they are (whoever
    compares them names what differs)."""
    legacy = {k for k in flat if _legacy_type(cls, k) is not None}
    if not legacy:
        return dict(flat)
    sections = {k.rpartition(".")[0] for k in legacy}
    leaves = _leaf_keys(cls)
    mine = [k for k in flat if k.rpartition(".")[0] in sections and (k in leaves or k in legacy)]
    try:
        now = flatten(_resolve(cls, [_Setting(k, flat[k], "saved config", False) for k in mine]))
    except ConfigError:
        return dict(flat)
    return {**{k: v for k, v in flat.items() if k not in legacy},
            **{k: now[k] for k in mine if k in now}}


def resolve_config(cls: type[T], files: Sequence[str | Path] = (), sets: Sequence[str] = ()) -> T:
    """Build a config from its defaults, then TOML files in order, then ``KEY=VALUE`` strings.

    Args:
        cls: The config dataclass (the root of the tree).
        files: TOML files, applied in order (later files win).
        sets: ``"train.lr=0.1"`` style overrides, parsed by each field's type.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: A missing file, an unknown key, a wrong type or an invalid value.

    Example:
        >>> resolve_config(RuntimeConfig, sets=["seed=3", "amp=bf16"]).amp
        'bf16'
    """
    settings = [s for f in files for s in _file_settings(f)] + [_set_setting(s) for s in sets]
    return _resolve(cls, settings)


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a config written by :func:`to_toml` (or any TOML preset); missing keys get defaults."""
    return resolve_config(cls, files=[path])


def override(config: T, values: Mapping[str, Any]) -> T:
    """A copy of ``config`` with dotted keys replaced by typed values, validated like a file.

    Example:
        >>> override(RuntimeConfig(), {"seed": 7}).seed
        7
    """
    settings = [_Setting(k, v, "override", False) for k, v in values.items()]
    return _resolve(type(config), settings, base=config)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a config tree (tuples and None kept as they are)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_config(type(value)):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out
