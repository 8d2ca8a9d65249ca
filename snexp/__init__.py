"""snexp: exact, fast Switchable Normalization and the plumbing to experiment with it.

Switchable Normalization (Luo et al., arXiv 1806.10779) normalizes with a learned mix of
instance, layer and batch statistics. This package holds the layers (dense, sparse,
synchronized), the registry through which models ask for normalizers, inspection of what each
layer learned, and the shared runtime of the experiment packages ``nas`` and ``stylize``.
"""

from snexp.checkpoint import load_checkpoint, save_checkpoint
from snexp.config import (
    CliError,
    ConfigError,
    RuntimeConfig,
    cli_errors,
    load_config,
    override,
    parse_args,
    to_toml,
)
from snexp.device import select_device
from snexp.inspect import Importance, importance, log_importance
from snexp.norm import (
    NORM_KINDS,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SyncSwitchNorm,
    convert_norm,
    load_official_state_dict,
    make_norm,
    norm_layer,
    recompute_batch_stats,
    set_sparsity,
    sparsemax,
    sparsestmax,
)
from snexp.run import NonFiniteLoss, Run, RunInterrupted
from snexp.track import Tracker, open_study, progress

__version__ = "0.1.0"

__all__ = [
    # runtime
    "CliError", "ConfigError", "NonFiniteLoss", "Run", "RunInterrupted", "RuntimeConfig",
    "Tracker", "cli_errors", "load_checkpoint", "load_config", "open_study", "override",
    "parse_args", "progress", "save_checkpoint", "select_device", "to_toml",
    # normalization
    "Importance", "NORM_KINDS", "SparseSwitchNorm1d", "SparseSwitchNorm2d",
    "SparseSwitchNorm3d", "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm",
    "convert_norm", "importance", "load_official_state_dict", "log_importance", "make_norm",
    "norm_layer", "recompute_batch_stats", "set_sparsity", "sparsemax", "sparsestmax",
]
