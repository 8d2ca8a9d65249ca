"""The experiment runtime of ``nas`` and ``stylize``: settings, runs, tracking, studies.

Kept apart from the layers so that ``import snexp`` stays light (no optuna, sqlalchemy,
tensorboard, tqdm or matplotlib); experiment code imports from here:

- :mod:`snexp.runtime.config`: frozen config dataclasses <- TOML <- flags <- ``--set``;
- :mod:`snexp.runtime.run`: the run directory, its lock, checkpoints and resume, signals, loop;
- :mod:`snexp.runtime.track`: TensorBoard events and progress bars;
- :mod:`snexp.runtime.study`: Optuna studies, storages (backend :mod:`snexp.runtime.storage`)
  and samplers;
- :mod:`snexp.runtime.distributed`, :mod:`snexp.runtime.checkpoint`,
  :mod:`snexp.runtime.device`.

The names below are re-exported lazily (PEP 562): ``from snexp.runtime import open_study``
imports :mod:`snexp.runtime.study` (and optuna) then, and only then, so that an entry point
that applies a model or retrains a cell loads neither optuna nor the run machinery through
this package.
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the public names it defines
_MODULES = {
    "checkpoint": ("load_checkpoint", "save_checkpoint"),
    "config": ("CliError", "ConfigError", "RuntimeConfig", "cli_errors", "load_config",
               "override", "parse_args", "to_toml"),
    "device": ("select_device",),
    "run": ("NonFiniteLoss", "Run", "RunInterrupted"),
    "study": ("WorkerSeededSampler", "check_study_storage", "dashboard_command", "open_storage",
              "open_study"),
    "track": ("Tracker", "progress"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError lets ``from snexp.runtime import distributed`` work
        raise AttributeError(f"module 'snexp.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"snexp.runtime.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
