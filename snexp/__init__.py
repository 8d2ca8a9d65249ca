"""snexp: exact, fast Switchable Normalization and the plumbing to experiment with it.

Switchable Normalization (Luo et al., arXiv 1806.10779) normalizes with a learned mix of
instance, layer and batch statistics. This package holds the layers (dense, sparse,
synchronized) and their functional form (``snexp.switch_norm``, as ``torch.nn.functional``),
the registry through which models ask for normalizers, and inspection of what each layer
learned. The experiment runtime of ``nas`` and ``stylize`` is :mod:`snexp.runtime`, imported
from there (``from snexp.runtime import Run``): the layers never reach into it, so that
``import snexp`` loads no optuna, sqlalchemy, tensorboard, tqdm or matplotlib.
"""

from __future__ import annotations

from snexp.norm import (
    NORM_KINDS,
    NormSpec,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SwitchNormBase,
    SyncSwitchNorm,
    convert_norm,
    load_official_state_dict,
    make_norm,
    norm_layer,
    parse_candidates,
    parse_prior,
    recompute_batch_stats,
    set_sparsity,
    sparsemax,
    sparsestmax,
    switch_norm,
)
from snexp.norm.importance import (
    Importance,
    importance,
    importance_param_groups,
    importance_parameters,
    log_importance,
)

__version__ = "0.1.0"

__all__ = [
    "Importance", "NORM_KINDS", "NormSpec", "SparseSwitchNorm1d", "SparseSwitchNorm2d",
    "SparseSwitchNorm3d", "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SwitchNormBase",
    "SyncSwitchNorm", "convert_norm", "importance", "importance_param_groups",
    "importance_parameters", "load_official_state_dict", "log_importance", "make_norm",
    "norm_layer", "parse_candidates", "parse_prior", "recompute_batch_stats", "set_sparsity",
    "sparsemax", "sparsestmax", "switch_norm",
]
