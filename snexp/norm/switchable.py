"""Switchable Normalization modules: SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization" (arXiv
1806.10779). Each layer normalizes with a softmax-weighted mix of candidate statistics (IN, LN,
BN and optionally GN) and learns the weights with the network. The arithmetic lives in
``snexp.norm.functional``; this file holds parameters, buffers and options.
:class:`SwitchNormBase` sets them up once for every layer on the SN op, also for layers that
keep several sets (stylize's conditional SN keeps one per style).

Names: the importance logits are parameters named as their state-dict keys
(:attr:`SwitchNormBase.logit_names`: the authors' ``mean_weight``/``var_weight``); code reads
them with ``importance_logits()`` and their weights (softmax, or sparsestmax for SSN) with
``importance_weights()``, and calls the two kinds ``mean_logits``/``var_logits`` and
``mean_p``/``var_p`` where they are locals or arguments.

Momentum follows PyTorch (``new = (1 - m) * old + m * batch``). The authors' code uses the
opposite convention: their ``momentum=0.9`` is our ``0.1`` and their ``0.997`` is our ``0.003``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from snexp.norm import functional as F

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SwitchNormBase", "parse_prior",
           "recompute_batch_stats"]

_COMPAT = ("paper", "official")


def _check_options(num_features: int, eps: float, momentum: float | None, compat: str) -> None:
    """Validate SN's scalar options (shared by every layer built on the SN op)."""
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (PyTorch convention: the authors' "
                         f"0.9 is our 0.1) or None, got {momentum!r}")
    if compat not in _COMPAT:
        raise ValueError(f"compat must be one of {_COMPAT}, got {compat!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


Prior = Mapping[str, float] | str | Sequence[str] | None


def parse_prior(prior: Prior, candidates: tuple[str, ...]) -> tuple[float, ...]:
    """The initial importance logits, one per candidate, from an importance prior.

    Args:
        prior: ``None`` or ``""`` (all logits 0: equal weights, the paper's start), a mapping
            ``{"bn": 4.0}``, or its text ``"bn:4"`` / ``"bn:4+ln:1"`` (also ``"bn:4,ln:1"``, or
            a sequence of ``"name:value"`` items, as :class:`snexp.NormSpec` reads
            ``prior=bn:4+ln:1``). Candidates not named start at logit 0.
        candidates: the layer's candidates, e.g. ``("in", "ln", "bn")``.

    Returns:
        One logit per candidate, in the order of ``candidates``.

    Raises:
        ValueError: a name that is not a candidate of the layer, or a value that is not a
            finite number.

    Example:
        >>> parse_prior("bn:4", ("in", "ln", "bn"))
        (0.0, 0.0, 4.0)
    """
    if prior is None:
        return (0.0,) * len(candidates)
    if isinstance(prior, str):
        prior = [item for part in prior.split("+") for item in part.split(",")]
    if not isinstance(prior, Mapping):
        items = {}
        for item in prior:
            name, colon, value = str(item).partition(":")
            if not name.strip() and not value.strip():
                continue
            if not colon:
                raise ValueError(f"importance prior item {item!r}: write name:logit, e.g. "
                                 f"'bn:4' (candidates {', '.join(candidates)})")
            items[name] = value
        prior = items
    logits = dict.fromkeys(candidates, 0.0)
    for name, value in prior.items():
        key = str(name).strip().lower()
        if key not in logits:
            raise ValueError(f"importance prior names {name!r}, not a candidate of this layer; "
                             f"valid names: {', '.join(candidates)}")
        try:
            logits[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"importance prior {name}:{value!r}: the logit must be a "
                             f"number") from None
        if not math.isfinite(logits[key]):
            raise ValueError(f"importance prior {name}:{value!r}: the logit must be finite")
    return tuple(logits.values())


def format_prior(logits: Sequence[float], candidates: tuple[str, ...]) -> str:
    """The text of a prior (``"bn:4"``), naming the non-zero logits only; ``""`` if uniform."""
    return "+".join(f"{c}:{v:g}" for c, v in zip(candidates, logits) if v)


class SwitchNormBase(nn.Module):
    """The options, parameters and buffers of a layer built on the SN op, set up once.

    :class:`SwitchNorm2d` and its kin, and layers that keep several sets of SN parameters and
    choose among them in ``forward`` (stylize's ``ConditionalSwitchNorm2d``, one set per
    style), stand on this class; it checks the options, creates the parameters and buffers and
    initializes them in :meth:`reset_parameters`. It has no ``forward``: a subclass calls
    :func:`snexp.switch_norm` with the tensors it picks.

    Parameters: ``weight``, ``bias`` (*copies, C) when ``affine``, and the importance logits
    (*copies, K), one per candidate, under the names of :attr:`logit_names`. Buffers, when "bn"
    is a candidate (else ``None``): ``running_mean``, ``running_var`` (*copies, C) and
    ``num_batches_tracked`` (*copies).

    Args:
        num_features: channel count C.
        eps, momentum, candidates: as :class:`SwitchNorm2d`.
        copies: ``()`` (the default) for one set of parameters and buffers; ``(S,)`` keeps S
            sets along a leading dimension (keyword-only from here on).
        affine, last_gamma, compat, prior, var_prior, device, dtype: as
            :class:`SwitchNorm2d`.

    Example:
        >>> class PerTask(SwitchNormBase):  # one SN parameter set per task
        ...     logit_names = ("mean_logits", "var_logits")
        >>> PerTask(16, copies=(3,)).mean_logits.shape
        torch.Size([3, 3])
    """

    #: The attribute names, which are also the state-dict keys, of the mean and variance
    #: importance logits. NOTE: SN layers keep the authors' names (``mean_weight``,
    #: ``var_weight``) so that their checkpoints load (:func:`snexp.load_official_state_dict`)
    #: and ours read alike; they are logits, not weights. A layer with several sets of logits
    #: names them otherwise, so that ``snexp.inspect`` does not read its (S, K) tensors as one
    #: layer's (K,) logits.
    logit_names: ClassVar[tuple[str, str]] = ("mean_weight", "var_weight")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        candidates: tuple[str, ...] = ("in", "ln", "bn"),
        *,
        copies: tuple[int, ...] = (),
        affine: bool = True,
        last_gamma: bool = False,
        compat: str = "paper",
        prior: Prior = None,
        var_prior: Prior = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_options(num_features, eps, momentum, compat)
        copies = tuple(copies)
        if not all(isinstance(n, int) and n > 0 for n in copies):
            raise ValueError(f"copies must be a tuple of positive ints, got {copies!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.candidates = F.parse_candidates(candidates, num_features)
        self.last_gamma = last_gamma
        self.affine = affine
        self.compat = compat
        # initial logits; all zeros is the paper's uniform start. The variance logits follow
        # the mean logits unless var_prior gives their own.
        self.prior = parse_prior(prior, self.candidates)
        self.var_prior = (self.prior if var_prior is None
                          else parse_prior(var_prior, self.candidates))
        channels, k = (*copies, num_features), (*copies, len(self.candidates))
        if affine:
            self.weight = nn.Parameter(torch.empty(channels, **factory))
            self.bias = nn.Parameter(torch.empty(channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        for name in self.logit_names:
            self.register_parameter(name, nn.Parameter(torch.empty(k, **factory)))
        if "bn" in self.candidates:
            self.register_buffer("running_mean", torch.zeros(channels, **factory))
            self.register_buffer("running_var", torch.ones(channels, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.zeros(copies, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Zero the running mean, set the running variance to one, reset the batch counter."""
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Importance logits at the prior (equal weights without one); ``weight`` ones (zeros
        with ``last_gamma``), ``bias`` 0; the running statistics reset."""
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            for logits, prior in zip(self.importance_logits(), (self.prior, self.var_prior)):
                logits.copy_(torch.tensor(prior, dtype=logits.dtype))

    def importance_logits(self) -> tuple[Tensor, Tensor]:
        """The mean and variance importance logits (*copies, K), the parameters themselves."""
        mean, var = self.logit_names
        return getattr(self, mean), getattr(self, var)

    def importance_weights(self) -> tuple[Tensor, Tensor]:
        """The mean and variance weights (*copies, K) over ``self.candidates`` (softmax of the
        logits)."""
        mean_logits, var_logits = self.importance_logits()
        return torch.softmax(mean_logits, -1), torch.softmax(var_logits, -1)


class _SwitchNorm(SwitchNormBase):
    """Common base of the Switchable Normalization layers (see :class:`SwitchNorm2d`).

    Parameters: ``weight``, ``bias`` (C,) and the importance logits ``mean_weight``,
    ``var_weight`` (K,), one per candidate; ``importance_weights()`` gives their softmax.
    """

    _ranks: tuple[int, ...] = (4,)
    _layout = "(N, C, H, W)"
    _sync = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        candidates: tuple[str, ...] = ("in", "ln", "bn"),
        *,
        moving_average: bool = True,
        last_gamma: bool = False,
        affine: bool = True,
        compat: str = "paper",
        prior: Prior = None,
        var_prior: Prior = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, candidates, last_gamma=last_gamma,
                         affine=affine, compat=compat, prior=prior, var_prior=var_prior,
                         device=device, dtype=dtype)
        self.moving_average = moving_average
        self._warned_batch1 = False

    def _group(self) -> str:
        """The process group pooling the BN statistics ("" for the local batch)."""
        if not (self._sync and self.training):
            return ""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return ""
        group = self.process_group or dist.group.WORLD
        return group.group_name if dist.get_world_size(group) > 1 else ""

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._ranks or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects input of shape "
                f"{self._layout.replace('C', str(self.num_features))}, got "
                f"{tuple(x.shape)}; check the channel count of the layer before it")
        if x.dim() == 2 and "in" in self.candidates:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) with candidate 'in' needs input "
                f"of shape (N, C, L) (instance statistics are over L), got {tuple(x.shape)}; "
                f"use candidates=('ln', 'bn') for (N, C) input")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got "
                            f"{x.dtype}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        has_bn = self.running_mean is not None
        if self.training and has_bn and x.shape[0] == 1 and not self._warned_batch1:
            warnings.warn(f"{type(self).__name__}({self.num_features}) is training with batch "
                          f"size 1: its BN candidate sees a single sample", stacklevel=2)
            self._warned_batch1 = True
        update = self.training and has_bn and self.moving_average
        if update:
            self.num_batches_tracked.add_(1)
        # Plain softmax weights are taken inside the fused function (fewer small ops); a
        # subclass with its own importance_weights (SparseSwitchNorm) hands probabilities.
        logits = type(self).importance_weights is SwitchNormBase.importance_weights
        mean_p, var_p = self.importance_logits() if logits else self.importance_weights()
        return F.switch_norm(
            x, self.weight, self.bias, mean_p, var_p, self.running_mean, self.running_var,
            candidates=self.candidates, training=self.training, eps=self.eps,
            momentum=self.momentum, update_running=update,
            num_batches_tracked=self.num_batches_tracked, compat=self.compat, logits=logits,
            group=self._group())

    def get_extra_state(self) -> dict:
        # Saved in the state dict so that a checkpoint names its candidates (snexp.inspect).
        return {"candidates": list(self.candidates), "compat": self.compat}

    def set_extra_state(self, state: dict) -> None:
        saved = tuple(state.get("candidates", self.candidates))
        if saved != self.candidates:
            raise ValueError(f"{type(self).__name__}({self.num_features}): checkpoint was saved "
                             f"with candidates {saved}, this layer has {self.candidates}; "
                             f"build the layer with candidates={saved}")

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
             f"candidates={self.candidates}")
        if not self.moving_average:
            s += ", moving_average=False"
        if not self.affine:
            s += ", affine=False"
        if self.compat != "paper":
            s += f", compat={self.compat!r}"
        if any(self.prior):
            s += f", prior={format_prior(self.prior, self.candidates)!r}"
        if self.var_prior != self.prior:
            s += f", var_prior={format_prior(self.var_prior, self.candidates)!r}"
        return s


class SwitchNorm2d(_SwitchNorm):
    """Switchable Normalization over (N, C, H, W) input.

    Args:
        num_features: channel count C.
        eps: added to the mixed variance. Default 1e-5.
        momentum: running-average factor, PyTorch convention (the authors' 0.9 is our 0.1);
            ``None`` for a cumulative average. Default 0.1.
        candidates: ordered subset of "in", "ln", "bn", "gn<G>". Default ("in", "ln", "bn").
        (keyword-only from here on)
        moving_average: ``True`` blends batch statistics into the running buffers while
            training; ``False`` is the paper's batch-average mode: call
            :func:`recompute_batch_stats` before evaluation.
        last_gamma: zero-initialize ``weight`` (last norm of a residual block).
        affine: learn ``weight`` and ``bias`` of shape (C,).
        compat: "paper" (exact equations, biased normalizing variance, running variance
            unbiased like ``nn.BatchNorm2d``) or "official" (the authors' released code:
            unbiased per-(n, c) variance inside every derivation).
        prior: initial importance logits, e.g. ``{"bn": 4.0}`` or ``"bn:4"``: logits
            (in, ln, bn) = (0, 0, 4), a BN share of 0.965 in the mean and the variance weights
            (see :func:`parse_prior`). ``None``: all logits 0, the paper's equal start.
            NOTE: the paper starts every layer uniform; a prior is this library's option for
            networks that cannot afford SN's uniform start (the weight-sharing NAS child,
            docs/nas.md). The weights stay learned.
        var_prior: the variance logits' own prior, in the same forms; ``None``: the same as
            ``prior``. SN mixes variances additively, so a small IN or LN share in the
            variance weights (whose variances exceed BN's by the spread of the means) shrinks
            every channel, while the same share in the mean weights costs little: the quick
            NAS preset starts the variance weights nearer BN than the mean weights.
        device, dtype: factory keywords for parameters and buffers.

    Example:
        >>> norm = SwitchNorm2d(64)
        >>> norm(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 64, 32, 32])
    """


class SwitchNorm1d(_SwitchNorm):
    """Switchable Normalization over (N, C) or (N, C, L) input.

    Same arguments as :class:`SwitchNorm2d`, but the default candidates are ("ln", "bn"), the
    only ones defined for (N, C) input (the authors' 1d layer); pass ("in", "ln", "bn") for
    (N, C, L) sequences.
    """

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 candidates: tuple[str, ...] = ("ln", "bn"), **kwargs) -> None:
        super().__init__(num_features, eps, momentum, candidates, **kwargs)


class SwitchNorm3d(_SwitchNorm):
    """Switchable Normalization over (N, C, D, H, W) input; arguments as SwitchNorm2d."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"


def recompute_batch_stats(model: nn.Module, loader, num_batches: int = 200) -> nn.Module:
    """Set every SN (and BN) layer's running statistics to the average over batches.

    The paper's batch-average mode (``moving_average=False``): after training, run
    ``num_batches`` batches through the model in training mode without gradients and store the
    mean of the batch means and of the (unbiased) batch variances, as the authors did before
    evaluation. Works like ``torch.optim.swa_utils.update_bn`` for SN layers.

    Args:
        model: any module containing SN layers.
        loader: iterable of batches; a batch is a tensor or a tuple/list whose first item is the
            input.
        num_batches: how many batches to average (fewer if the loader ends first).

    Returns:
        The model, in the training mode it had before.
    """
    norms = [m for m in model.modules()
             if isinstance(m, (_SwitchNorm, nn.modules.batchnorm._BatchNorm))
             and m.running_mean is not None]
    if not norms:
        return model
    saved = [(m, m.momentum, getattr(m, "moving_average", None)) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        if isinstance(m, _SwitchNorm):
            m.moving_average = True
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device, non_blocking=True))
    finally:
        for m, momentum, moving in saved:
            m.momentum = momentum
            if moving is not None:
                m.moving_average = moving
        model.train(was_training)
    return model
