"""The experiment runtime of ``nas`` and ``stylize``: settings, runs, tracking, studies.

Kept apart from the layers so that ``import snexp`` stays light (no optuna, sqlalchemy,
tensorboard, tqdm or matplotlib); experiment code imports from here:

- :mod:`snexp.runtime.config`: frozen config dataclasses <- TOML <- flags <- ``--set``;
- :mod:`snexp.runtime.run`: the run directory, its lock, checkpoints and resume, signals, loop;
- :mod:`snexp.runtime.track`: TensorBoard, Optuna trials, progress bars;
- :mod:`snexp.runtime.storage`, :mod:`snexp.runtime.samplers`: Optuna storages and samplers;
- :mod:`snexp.runtime.distributed`, :mod:`snexp.runtime.checkpoint`,
  :mod:`snexp.runtime.device`.
"""

from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint
from snexp.runtime.config import (
    CliError,
    ConfigError,
    RuntimeConfig,
    cli_errors,
    load_config,
    override,
    parse_args,
    to_toml,
)
from snexp.runtime.device import select_device
from snexp.runtime.run import NonFiniteLoss, Run, RunInterrupted
from snexp.runtime.track import Tracker, open_study, progress

__all__ = [
    "CliError", "ConfigError", "NonFiniteLoss", "Run", "RunInterrupted", "RuntimeConfig",
    "Tracker", "cli_errors", "load_checkpoint", "load_config", "open_study", "override",
    "parse_args", "progress", "save_checkpoint", "select_device", "to_toml",
]
