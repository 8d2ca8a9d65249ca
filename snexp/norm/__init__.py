"""Normalization layers: Switchable Normalization, its sparse and synchronized variants."""

from snexp.norm.factory import NORM_KINDS, NormSpec, convert_norm, make_norm, norm_layer
from snexp.norm.functional import parse_candidates, sparsemax, sparsestmax, switch_norm
from snexp.norm.official import load_official_state_dict
from snexp.norm.sparse import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    set_sparsity,
)
from snexp.norm.switchable import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SwitchNormBase,
    parse_prior,
    recompute_batch_stats,
)
from snexp.norm.sync import SyncSwitchNorm

__all__ = [
    "NORM_KINDS", "NormSpec", "SparseSwitchNorm1d", "SparseSwitchNorm2d", "SparseSwitchNorm3d",
    "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SwitchNormBase", "SyncSwitchNorm",
    "convert_norm", "load_official_state_dict", "make_norm", "norm_layer", "parse_candidates",
    "parse_prior", "recompute_batch_stats", "set_sparsity", "sparsemax", "sparsestmax",
    "switch_norm",
]
