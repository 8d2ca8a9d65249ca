"""The command line of an entry point: an argparse parser for a config tree, and parsing.

:func:`build_parser` turns a config dataclass into a parser with ``--config FILE`` (or a
preset name), ``--set KEY=VALUE``, the runtime flags (:data:`~snexp.runtime.config.RUNTIME_FLAGS`)
and the experiment's everyday flags, each with its field comment and default in ``--help``.
:func:`parse_args` layers the result (:mod:`snexp.runtime.config.resolve`) and, on ``--resume``,
puts
the run's saved ``config.toml`` beneath the user's changes. No ``argparse.Namespace`` leaves
this module.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from snexp.runtime.config.errors import ConfigError
from snexp.runtime.config.resolve import _file_settings, _resolve, _set_setting, _Setting, flatten
from snexp.runtime.config.runtime import CONFIG_FILE, RUNTIME_FLAGS, RuntimeConfig
from snexp.runtime.config.schema import (
    _comments,
    _hints,
    _is_text_value,
    _leaf_keys,
    _lookup,
    _split_top_level,
)
from snexp.runtime.config.writer import _toml_value

__all__ = ["build_parser", "parse_args"]

T = TypeVar("T")


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
    defaults: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser for a config tree: ``--config``, ``--set``, runtime and everyday flags.

    Args:
        cls: The root config dataclass. When it has a ``runtime: RuntimeConfig`` field, the
            :data:`RUNTIME_FLAGS` (``--out``, ``--resume``, ``--seed``, ...) are added.
        prog: Program name for usage and messages, e.g. ``"python -m nas.search"``.
        description: Text shown by ``--help`` above the flags.
        flags: The experiment's everyday flags, flag -> dotted key (``{"--epochs":
            "train.epochs"}``). Booleans become ``--x/--no-x``; tuples are repeatable.
        defaults: Flat ``key -> value`` shown as each key's default (default: the
            dataclasses' own; :func:`parse_args` passes those of its default preset).

    Returns:
        The parser. Use :func:`parse_args` to get a config; the parser alone returns raw text.
    """
    table = dict(RUNTIME_FLAGS) if _hints(cls).get("runtime") is RuntimeConfig else {}
    table.update(flags or {})
    defaults = _defaults(cls) if defaults is None else defaults
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
    preset_dir = Path(presets) if presets is not None else None
    shown = None  # --help shows what a run without --config gets: the default preset's values
    if default_config:
        with contextlib.suppress(ConfigError):  # a broken preset is reported when read below
            preset = _find_config(default_config, preset_dir)
            shown = flatten(_resolve(cls, list(_file_settings(preset))))
    parser = build_parser(cls, prog=prog, description=description, flags=flags,
                          defaults=shown)
    namespace = vars(parser.parse_args(argv))
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
    --mix 0.7``. Items of text (e.g. file names, which may hold commas) are kept whole; text
    values (``--norms "sn(candidates=ln+bn, momentum=0.2), in"``) split at top-level commas."""
    if not isinstance(value, list):
        return value
    tp = _lookup(cls, key, key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is not tuple or typing.get_args(tp)[0] is str:
        return value
    split = _split_top_level if _is_text_value(typing.get_args(tp)[0]) else (
        lambda text: text.split(","))
    return [part.strip() for v in value for part in split(v) if part.strip()]
