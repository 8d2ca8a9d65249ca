"""Experiment configs: frozen dataclasses <- TOML files <- command-line flags <- ``--set``.

An experiment's settings are a tree of frozen dataclasses, one per component, with the paper's
defaults in code and a comment per field (nanoGPT's ``GPTConfig``). Presets are TOML files
(``configs/<experiment>/<name>.toml``) that override only what differs. An entry point layers,
from lowest to highest precedence::

    defaults in code < --config FILE (repeatable) < everyday flags (--epochs 3) < --set KEY=VALUE

On ``--resume`` the run's saved ``<out>/config.toml`` slides in right above the defaults, so a
resumed run gets its original settings back and the user's flags are exactly the changes asked
for (:class:`snexp.run.Run` then refuses unsafe ones).

Field types understood: ``bool``, ``int``, ``float``, ``str``, ``typing.Literal[...]`` (the
allowed choices), ``X | None`` (written ``none`` in TOML and on the command line),
``tuple[X, ...]`` (a TOML array; on the command line ``a,b`` or a repeated flag) and nested
dataclasses (TOML tables, dotted keys such as ``train.lr``). Unknown keys, wrong types,
missing files and invalid choices raise :class:`ConfigError`, whose message names the key, the
bad value, what is allowed and the closest valid spellings; :func:`cli_errors` turns it into
one paragraph on stderr and exit status 2. No ``exec``, no ``argparse.Namespace`` leaks out.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import math
import re
import shutil
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "CONFIG_FILE",
    "RUNTIME_FLAGS",
    "CliError",
    "ConfigError",
    "RuntimeConfig",
    "build_parser",
    "cli_errors",
    "flatten",
    "load_config",
    "override",
    "parse_args",
    "resolve_config",
    "to_toml",
]

T = TypeVar("T")

CONFIG_FILE = "config.toml"  # name of the resolved config inside a run directory
_NONE = "none"  # how None is spelled in TOML files and on the command line
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class CliError(Exception):
    """An error whose message is meant for the person at the command line.

    :func:`cli_errors` prints it as ``<prog>: <label>: <message>`` without a traceback and
    exits with :attr:`exit_code`.
    """

    exit_code: int = 1
    label: str = "error"


class ConfigError(CliError, ValueError):
    """A mistake in the configuration or the command line; refused before any work starts."""

    exit_code = 2


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """The settings every entry point shares (the ``[runtime]`` section)."""

    out: str | None = None  # run directory; none: runs/<experiment>/<YYYYmmdd-HHMMSS>
    resume: bool = False  # continue the run in --out from its checkpoints/last.pt
    overwrite: bool = False  # delete an existing run directory at --out and start afresh
    checkpoint_every: int = 0  # also checkpoint every N steps (epoch and run ends always)
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    seed: int = 0  # seed of the python, numpy and torch random generators
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast precision; fp16 adds a GradScaler
    deterministic: bool = False  # deterministic algorithms only (exact resume on CPU)
    channels_last: bool = False  # channels-last memory format for models and image batches
    compile: bool = False  # torch.compile the model (the checkpoint keeps the plain module)
    sync_norm: bool = False  # under torchrun: SN/BN batch statistics over all ranks (SyncSN)

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: pick one")


# Flags every entry point gets (when its config has a ``runtime`` section), flag -> key.
RUNTIME_FLAGS: dict[str, str] = {
    "--out": "runtime.out",
    "--resume": "runtime.resume",
    "--overwrite": "runtime.overwrite",
    "--checkpoint-every": "runtime.checkpoint_every",
    "--device": "runtime.device",
    "--seed": "runtime.seed",
    "--amp": "runtime.amp",
    "--deterministic": "runtime.deterministic",
    "--channels-last": "runtime.channels_last",
    "--compile": "runtime.compile",
    "--sync-norm": "runtime.sync_norm",
}


# ----------------------------------------------------------------------------- introspection


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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


def _describe(tp: Any) -> str:
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
                items = [v.strip() for v in value.split(",")] if value.strip() else []
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
            try:
                return int(value.strip())
            except ValueError:
                raise wrong() from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if text and isinstance(value, str):
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
    raise TypeError(f"config field {key}: unsupported type {tp!r}")


# ----------------------------------------------------------------------------- layering


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


def _resolve(cls: type[T], settings: Sequence[_Setting], base: Any = None) -> T:
    values: dict[str, Any] = {}
    for s in settings:
        tp = _lookup(cls, s.key, s.source)
        values[s.key] = _coerce(s.value, tp, s.key, s.source, s.text)
    return _build(cls, values, "", base)


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
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


# ----------------------------------------------------------------------------- TOML writer

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
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
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


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse with close-match suggestions for mistyped flags."""

    def error(self, message: str) -> typing.NoReturn:
        match = re.match(r"unrecognized arguments: (.*)", message)
        if match:
            known = [
                o
                for a in self._actions
                for o in a.option_strings
                if o.startswith("--") and o != "--help"
            ]
            for arg in match.group(1).split():
                flag = arg.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
                if flag.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def _help_text(cls: type, key: str, defaults: Mapping[str, Any]) -> str:
    *sections, name = key.split(".")
    owner = cls
    for s in sections:
        owner = _hints(owner)[s]
    note = _comments(owner).get(name, "")
    default = f"default: {_toml_value(defaults[key])}; " if key in defaults else ""
    return f"{note} ({default}--set {key}=...)".strip().replace("%", "%%")


def _defaults(cls: type) -> dict[str, Any]:
    try:
        return flatten(cls())
    except (TypeError, ValueError):  # a config with required fields has no defaults to show
        return {}


def _metavar(tp: Any, key: str) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _metavar(next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        return _metavar(args[0], key)
    return {int: "N", float: "X"}.get(tp, key.rpartition(".")[2].upper())


def build_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser for a config tree: ``--config``, ``--set``, runtime and everyday flags.

    Args:
        cls: The root config dataclass. When it has a ``runtime: RuntimeConfig`` field, the
            :data:`RUNTIME_FLAGS` (``--out``, ``--resume``, ``--seed``, ...) are added.
        prog: Program name for usage and messages, e.g. ``"python -m nas.search"``.
        description: Text shown by ``--help`` above the flags.
        flags: The experiment's everyday flags, flag -> dotted key (``{"--epochs":
            "train.epochs"}``). Booleans become ``--x/--no-x``; tuples are repeatable.

    Returns:
        The parser. Use :func:`parse_args` to get a config; the parser alone returns raw text.
    """
    table = dict(RUNTIME_FLAGS) if _hints(cls).get("runtime") is RuntimeConfig else {}
    table.update(flags or {})
    defaults = _defaults(cls)
    epilog = "keys for --set KEY=VALUE (with their defaults):\n" + "\n".join(
        f"  {k} = {_toml_value(defaults[k])}" if k in defaults else f"  {k}"
        for k in _leaf_keys(cls)
    )
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        dest="__config",
        help="TOML file or preset name to start from (repeatable; later wins)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="__set",
        help="override any key, e.g. --set train.lr=0.1 (repeatable; wins over flags and files)",
    )
    for flag, key in table.items():
        tp = _lookup(cls, key, f"flag {flag}")
        help_text = _help_text(cls, key, defaults)
        if tp is bool:
            parser.add_argument(
                flag, dest=key, default=None, help=help_text, action=argparse.BooleanOptionalAction
            )
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(
                flag,
                dest=key,
                default=None,
                action="append",
                metavar=_metavar(tp, key),
                help=help_text + " (repeatable)",
            )
        else:
            parser.add_argument(
                flag, dest=key, default=None, help=help_text, metavar=_metavar(tp, key)
            )
    return parser


def _find_config(name: str, presets: Path | None) -> Path:
    path = Path(name)
    if not path.exists() and presets is not None and path.parent == Path("."):
        preset = presets / (name if name.endswith(".toml") else f"{name}.toml")
        if preset.is_file() or path.suffix != ".toml":
            return preset
    return path


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    flags: Mapping[str, str] | None = None,
    presets: str | Path | None = None,
    default_config: str | None = None,
) -> T:
    """Parse a command line into a validated config (defaults < files < flags < ``--set``).

    Args:
        cls: The root config dataclass.
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
        prog: Program name for usage and messages.
        description: Text shown by ``--help``.
        flags: Everyday flags, flag -> dotted key (see :func:`build_parser`).
        presets: Directory of named presets: ``--config quick`` reads ``<presets>/quick.toml``.
        default_config: Preset name or file used when no ``--config`` is given.

    Returns:
        The config. With ``--resume --out DIR``, ``DIR/config.toml`` is the base layer (in
        place of ``default_config``).

    Raises:
        ConfigError: For any mistake; wrap the call in :func:`cli_errors`.
        SystemExit: For ``--help`` and for flags argparse itself rejects (exit status 2).

    Example:
        >>> cfg = parse_args(RuntimeConfig, ["--set", "seed=1"])  # doctest: +SKIP
    """
    parser = build_parser(cls, prog=prog, description=description, flags=flags)
    namespace = vars(parser.parse_args(argv))
    preset_dir = Path(presets) if presets is not None else None
    explicit = [_find_config(n, preset_dir) for n in namespace.pop("__config")]
    files = explicit or ([_find_config(default_config, preset_dir)] if default_config else [])
    sets = [_set_setting(s) for s in namespace.pop("__set")]
    option = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    flags_given = [
        _Setting(key, _split_items(cls, key, value), option[key], not isinstance(value, bool))
        for key, value in namespace.items()
        if value is not None
    ]
    config = _resolve(cls, [s for f in files for s in _file_settings(f)] + flags_given + sets)
    runtime = getattr(config, "runtime", None)
    if isinstance(runtime, RuntimeConfig) and runtime.resume and runtime.out:
        saved = Path(runtime.out) / CONFIG_FILE
        if saved.is_file():  # the run's own settings replace the default preset
            layers = [saved, *explicit]
            config = _resolve(
                cls, [s for f in layers for s in _file_settings(f)] + flags_given + sets
            )
    return config


def _split_items(cls: type, key: str, value: Any) -> Any:
    """A repeatable flag of numbers also takes comma lists: ``--mix 0.3,0.7`` or ``--mix 0.3
    --mix 0.7``. Items of text (e.g. file names, which may hold commas) are kept whole."""
    if not isinstance(value, list):
        return value
    tp = _lookup(cls, key, key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is not tuple or typing.get_args(tp)[0] is str:
        return value
    return [part.strip() for v in value for part in v.split(",") if part.strip()]


def _prog_name() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return "python -m " + spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


@contextlib.contextmanager
def cli_errors(prog: str | None = None) -> Iterator[None]:
    """Turn :class:`CliError` (and Ctrl-C) into one paragraph on stderr and an exit status.

    Wrap an entry point's body in it; real bugs still raise with their traceback.

    Example:
        >>> def main(argv=None):  # doctest: +SKIP
        ...     with cli_errors("python -m nas.search"):
        ...         cfg = parse_args(SearchConfig, argv)
        ...         ...
    """
    name = prog or _prog_name()
    try:
        yield
    except CliError as exc:
        width = max(40, min(120, shutil.get_terminal_size().columns))
        text = " ".join(f"{name}: {exc.label}: {exc}".split())
        print(
            textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False),
            file=sys.stderr,
        )
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
