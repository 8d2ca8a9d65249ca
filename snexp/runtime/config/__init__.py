"""Experiment configs: frozen dataclasses <- TOML files <- command-line flags <- ``--set``.

An experiment's settings are a tree of frozen dataclasses, one per component, with the paper's
defaults in code and a comment per field (nanoGPT's ``GPTConfig``). Presets are TOML files
(``configs/<experiment>/<name>.toml``) that override only what differs. An entry point layers,
from lowest to highest precedence::

    defaults in code < --config FILE (repeatable) < everyday flags (--epochs 3) < --set KEY=VALUE

On ``--resume`` the run's saved ``<out>/config.toml`` slides in right above the defaults, so a
resumed run gets its original settings back and the user's flags are exactly the changes asked
for (:class:`snexp.runtime.run.Run` then refuses unsafe ones).

Field types understood: ``bool``, ``int``, ``float``, ``str``, ``typing.Literal[...]`` (the
allowed choices), ``X | None`` (written ``none`` in TOML and on the command line),
``tuple[X, ...]`` (a TOML array; on the command line ``a,b`` or a repeated flag) and nested
dataclasses (TOML tables, dotted keys such as ``train.lr``). Unknown keys, wrong types,
missing files and invalid choices raise :class:`ConfigError`, whose message names the key, the
bad value, what is allowed and the closest valid spellings; :func:`cli_errors` turns it into
one paragraph on stderr and exit status 2. No ``exec``, no ``argparse.Namespace`` leaks out.

The package, from the bottom up:

- :mod:`snexp.runtime.config.errors`: :class:`CliError`, :class:`ConfigError`, :func:`cli_errors`;
- :mod:`snexp.runtime.config.runtime`: :class:`RuntimeConfig` (the ``[runtime]`` section every
entry
  point shares), its flags :data:`RUNTIME_FLAGS` and :data:`CONFIG_FILE`;
- :mod:`snexp.runtime.config.bounds`: :class:`Range`, the allowed values of a numeric field
  (``Annotated[float, Range(gt=0)]``); every float must also be finite unless it opts out;
- :mod:`snexp.runtime.config.schema`: field types, comments and dotted keys of a config tree, and
the
  typed checking and parsing of one value;
- :mod:`snexp.runtime.config.resolve`: layering TOML files and ``KEY=VALUE`` settings into a config
  (:func:`resolve_config`, :func:`load_config`, :func:`override`, :func:`flatten`);
- :mod:`snexp.runtime.config.writer`: :func:`to_toml`, a commented TOML file that reads back;
- :mod:`snexp.runtime.config.cli`: the argparse parser (:func:`build_parser`) and
:func:`parse_args`.
"""

from snexp.runtime.config.bounds import Range
from snexp.runtime.config.cli import build_parser, parse_args
from snexp.runtime.config.errors import CliError, ConfigError, cli_errors
from snexp.runtime.config.resolve import flatten, load_config, override, resolve_config
from snexp.runtime.config.runtime import CONFIG_FILE, RUNTIME_FLAGS, RuntimeConfig
from snexp.runtime.config.writer import to_toml

__all__ = [
    "CONFIG_FILE",
    "RUNTIME_FLAGS",
    "CliError",
    "ConfigError",
    "Range",
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
