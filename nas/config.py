"""Configs of ``python -m nas.search`` and ``python -m nas.train``: frozen dataclasses.

Defaults are ENAS's CIFAR-10 micro settings (Pham et al. 2018, official
``scripts/cifar10_micro_search.sh`` and ``cifar10_micro_final.sh``); presets in
``configs/nas/`` override what differs (``quick`` is the default of both commands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

from nas.controller import ControllerConfig
from nas.data import DataConfig
from snexp import NORM_KINDS, NormSpec
from snexp.runtime.config import Range, RuntimeConfig

__all__ = ["COMMON_FLAGS", "PRESETS", "ChildConfig", "OptimConfig", "RetrainConfig",
           "RetrainSettings", "SearchConfig", "SearchSettings"]

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "nas"  # --config NAME looks here
COMMON_FLAGS = {  # flags of both nas.search and nas.train, and the keys they set
    "--dataset": "data.dataset",
    "--data-root": "data.root",
    "--norm": "child.norm",
    "--epochs": "train.epochs",
}


_GN_GROUPS = 4  # groups of a bare --norm gn: snexp's 32 divides no ENAS width (20, 36)


@dataclass(frozen=True)
class ChildConfig:
    """The child network (search: 6 layers x 20 filters; retraining: 15 x 36)."""

    # e.g. "bn", "sn(prior=bn:4)" (SN importance logits (in, ln, bn) = (0, 0, 4): BN share
    # 0.965; no prior: equal weights, the SN paper), "sn(prior=bn:4, var_prior=bn:6)" (the
    # variance logits their own prior: the quick preset), "sn(momentum=0.003)" (PyTorch's momentum
    # convention: the SN authors' 0.9 is 0.1), "gn(groups=4)" (a bare "gn" gets 4 groups)
    norm: NormSpec = NormSpec("sn")  # every norm of the child, with its options (snexp.NormSpec)
    layers: int = 6  # normal cells; two reduction cells are added between the stages
    filters: int = 20  # channels of the first stage (doubled at each reduction)
    num_nodes: int = 5  # computed nodes per cell (B)
    dropout: float = 0.1  # dropout before the classifier (ENAS keep_prob 0.9 search, 0.8 final)
    # Keys of config.toml files written before the norm became one spec; upgrade_legacy folds
    # them into `norm` (so old run folders resume), as the options they stood for.
    LEGACY_KEYS: ClassVar[dict[str, type]] = {"momentum": float, "prior": str, "gn_groups": int}

    @classmethod
    def upgrade_legacy(cls, fields: dict, old: dict) -> dict:
        """``norm`` with the old keys folded in: ``gn_groups`` only for gn, ``prior`` only for
        SN/SSN (both rows' logits; ``""``: none, the uniform start), ``momentum`` for
        SN/SSN/BN (the layers' default 0.1 adds nothing, so an old default file reads as a new
        one)."""
        spec: NormSpec = fields["norm"]
        options = dict(spec.options)
        if spec.kind == "gn" and "gn_groups" in old:
            options["groups"] = old["gn_groups"]
        if spec.kind in ("sn", "ssn") and "prior" in old:
            options.pop("var_prior", None)  # the old key set both rows' logits
            if old["prior"]:
                options["prior"] = old["prior"]
            else:
                options.pop("prior", None)
        if spec.kind in ("sn", "ssn", "bn") and "momentum" in old and (
                old["momentum"] != 0.1 or "momentum" in options):
            options["momentum"] = old["momentum"]
        return {"norm": NormSpec(spec.kind, options)}

    def __post_init__(self) -> None:
        if self.layers < 1 or self.filters < 1 or self.num_nodes < 1:
            raise ValueError("layers, filters and num_nodes must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        norm = NormSpec.parse(self.norm)
        if norm.kind == "gn" and "groups" not in dict(norm.options):
            # NOTE: a bare --norm gn means 4 groups (the child's gn_groups default before the
            # norm became one spec); the recorded spec says so: gn(groups=4).
            norm = NormSpec("gn", dict(norm.options), groups=_GN_GROUPS)
        object.__setattr__(self, "norm", norm)
        _check_norm(norm, self.filters)


def _check_norm(norm: NormSpec, filters: int) -> None:
    """Build one norm of the narrowest width (every width of the child is a multiple of
    ``filters``) so that a bad option fails before the run, with the fix."""
    groups = dict(norm.options).get("groups")
    if norm.kind == "gn" and (not isinstance(groups, int) or groups < 1 or filters % groups):
        fits = [g for g in range(1, filters + 1) if filters % g == 0]
        good = max((g for g in fits if g <= _GN_GROUPS), default=1)
        raise ValueError(f"child.norm '{norm}': groups={groups} must divide filters={filters} "
                         f"(every width of the child is a multiple of filters); write --norm "
                         f"'gn(groups={good})' (groups dividing {filters}: "
                         f"{', '.join(map(str, fits))}) or change child.filters")
    try:
        norm.layer()(filters)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"child.norm '{norm}': {exc}. Options are those of the layer "
                         f"(snexp.NormSpec), e.g. --norm 'sn(prior=bn:4)', --norm "
                         f"'sn(momentum=0.003, candidates=ln+bn)' or --norm 'gn(groups=4)'; "
                         f"kinds: {', '.join(NORM_KINDS)}") from None


@dataclass(frozen=True)
class OptimConfig:
    """SGD with Nesterov momentum and cosine annealing with warm restarts (ENAS)."""

    epochs: int = 150  # passes over the training split
    batch_size: int = 160  # images per step
    # Steps per epoch, whatever the split's size (the data cycles); ENAS's CIFAR-10 search
    # epoch is ceil(45000 / 160) = 282 steps. none: one pass over the split (ENAS's definition).
    steps_per_epoch: int | None = 282
    lr_max: float = 0.05  # learning rate at each (re)start
    lr_min: float = 0.0005  # learning rate at the end of each cosine period (ENAS final: 1e-4)
    t0: int = 10  # epochs of the first cosine period
    t_mul: int = 2  # each period is t_mul times longer than the one before
    momentum: float = 0.9  # Nesterov momentum
    # ENAS's convention: l2_reg * sum(w^2) over every weight is added to the loss, so the
    # gradient gains 2 * l2_reg * w (torch's weight_decay would be 2 * l2_reg).
    l2_reg: float = 1e-4  # ENAS child_l2_reg (search 1e-4, final 2e-4)
    # NOTE: ENAS's flag is 5, but its "norm" clip mode returns the unclipped gradients, so the
    # official code never clips; 0 turns clipping off here.
    grad_clip: float = 5.0  # clip the loss gradient's global norm to this (before the L2 term)
    eval_batch_size: int = 500  # images per evaluation batch
    # The SN importance logits in their own group (snexp.importance_param_groups): lr factor
    # and whether ENAS's L2 term reaches them. 1 and true: the SN paper (like every weight).
    importance_lr_mult: Annotated[float, Range(ge=0)] = 1.0
    importance_l2: bool = True

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.t0, self.t_mul, self.eval_batch_size) < 1:
            raise ValueError("epochs, batch_size, t0, t_mul and eval_batch_size must be >= 1")
        for name in ("lr_max", "lr_min", "l2_reg", "momentum", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        if not 0.0 <= self.l2_reg < 1.0 or not self.lr_max > 0 or not 0 <= self.lr_min:
            raise ValueError(f"need 0 <= l2_reg < 1, lr_max > 0 and lr_min >= 0; got "
                             f"{self.l2_reg}, {self.lr_max}, {self.lr_min}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or none, got {self.steps_per_epoch}")


@dataclass(frozen=True)
class SearchSettings:
    """The derive step and where the search is recorded."""

    derive_samples: int = 10  # architectures evaluated on the valid split after each epoch
    derive_final: int = 100  # architectures evaluated after the last epoch
    reward_batch_size: int = 160  # valid images of one reward (ENAS: one minibatch)
    study: str = "nas-search"  # Optuna study of the derived architectures
    storage: str | None = None  # Optuna storage (none: sqlite <out>/optuna.db)
    importance_every: int = 5  # log the SN importance of every child layer every N epochs
    aux_weight: float = 0.4  # weight of the auxiliary head's loss (ENAS search: 0.4; 0: no head)

    def __post_init__(self) -> None:
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if min(self.derive_samples, self.derive_final, self.reward_batch_size) < 1:
            raise ValueError("derive_samples, derive_final and reward_batch_size must be >= 1")


@dataclass(frozen=True)
class SearchConfig:
    """``python -m nas.search``."""

    data: DataConfig = field(default_factory=DataConfig)
    child: ChildConfig = field(default_factory=ChildConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    search: SearchSettings = field(default_factory=SearchSettings)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass(frozen=True)
class RetrainSettings:
    """What is retrained and the regularizers of the final training (ENAS final)."""

    arch: str | None = None  # best_arch.json, the architecture string or a flat list
    aux_weight: float = 0.4  # weight of the auxiliary head's loss (0: no head)
    drop_path_keep: float = 0.6  # keep probability of drop path at the end (1: off)
    eval_every: int = 1  # evaluate on the test split every N epochs (and at the end)

    def __post_init__(self) -> None:
        if not 0.0 < self.drop_path_keep <= 1.0:
            raise ValueError(f"drop_path_keep must be in (0, 1], got {self.drop_path_keep}")
        if self.aux_weight < 0 or self.eval_every < 1:
            raise ValueError("aux_weight must be >= 0 and eval_every >= 1")


@dataclass(frozen=True)
class RetrainConfig:
    """``python -m nas.train``: the fixed network from scratch on train + valid."""

    data: DataConfig = field(default_factory=lambda: DataConfig(cutout=16))
    child: ChildConfig = field(
        default_factory=lambda: ChildConfig(layers=15, filters=36, dropout=0.2))
    train: OptimConfig = field(
        default_factory=lambda: OptimConfig(epochs=630, batch_size=144, steps_per_epoch=348,
                                    l2_reg=2e-4, lr_min=1e-4)  # 348 = ceil(50000 / 144)
    )
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
