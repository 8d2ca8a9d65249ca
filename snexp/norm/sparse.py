"""Sparse Switchable Normalization: SparseSwitchNorm1d/2d/3d and set_sparsity.

Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax" (CVPR 2019).
SparsestMax replaces softmax: ``w = sparsemax(v)`` (Euclidean projection onto the simplex,
Martins & Astudillo 2016); with ``u`` uniform over the support of ``w``, if ``||w - u|| < r``
then ``w`` is pushed out to the sphere of radius ``r`` around ``u``; if that leaves the simplex,
``w`` is projected back (which shrinks the support) and the step repeats. As ``r`` grows to 1
every layer ends with exactly one normalizer, which is then frozen in a buffer. The two
projections are functions of :mod:`snexp.norm.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from snexp.norm.functional import sparsestmax
from snexp.norm.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, _SwitchNorm

__all__ = ["SparseSwitchNorm1d", "SparseSwitchNorm2d", "SparseSwitchNorm3d", "set_sparsity"]


class _Sparse(_SwitchNorm):
    """SparsestMax importance weights plus the frozen one-hot choice, on any SN layer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        k = len(self.candidates)
        device = self.mean_weight.device
        self.register_buffer("radius", torch.zeros((), device=device))
        self.register_buffer("mean_fixed", torch.zeros(k, device=device))
        self.register_buffer("var_fixed", torch.zeros(k, device=device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "radius"):
            self.mean_fixed.zero_()
            self.var_fixed.zero_()

    def importance_weights(self) -> tuple[Tensor, Tensor]:
        """SparsestMax weights; once a weight vector is one-hot it is frozen for good."""
        fixed = torch.stack([self.mean_fixed, self.var_fixed])
        if (not torch.is_grad_enabled() and fixed.is_cpu and not torch.compiler.is_compiling()
                and bool((fixed.sum(-1) > 0).all())):
            # inference with both rows frozen: sparsestmax would be computed to be discarded
            # (a host read, so CPU only; a trained SSN model has every layer frozen)
            return fixed[0], fixed[1]
        # mean and variance rows in one (2, K) batch: half the small ops of two calls
        w = sparsestmax(torch.stack(self.importance_logits()), self.radius)
        if self.training:
            with torch.no_grad():
                free = fixed.sum(-1, keepdim=True) == 0  # rows not yet frozen
                onehot = (w.detach().amax(-1, keepdim=True) >= 1) & free
                fixed = torch.where(onehot, w.detach(), fixed)
                torch._foreach_copy_([self.mean_fixed, self.var_fixed], list(fixed.unbind(0)))
        out = torch.where(fixed.sum(-1, keepdim=True) > 0, fixed, w)
        return out[0], out[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", radius={float(self.radius):.3g}"


class SparseSwitchNorm1d(_Sparse, SwitchNorm1d):
    """Sparse SN over (N, C) or (N, C, L); arguments as :class:`SwitchNorm1d`."""


class SparseSwitchNorm2d(_Sparse, SwitchNorm2d):
    """Sparse SN over (N, C, H, W); arguments as :class:`snexp.SwitchNorm2d`.

    The sphere radius is the buffer ``radius`` (0 at start: plain sparsemax); grow it with
    :func:`set_sparsity` as training progresses (the authors grow it linearly to 1).

    Example:
        >>> norm = SparseSwitchNorm2d(16)
        >>> set_sparsity(norm, 1.0)
        1
    """


class SparseSwitchNorm3d(_Sparse, SwitchNorm3d):
    """Sparse SN over (N, C, D, H, W); arguments as :class:`snexp.SwitchNorm2d`."""


def set_sparsity(model: nn.Module, radius: float) -> int:
    """Set the SparsestMax radius of every sparse SN layer in ``model``.

    Args:
        model: any module.
        radius: in [0, 1]; 0 is sparsemax, 1 forces one normalizer per layer.

    Returns:
        How many layers were set.
    """
    if not 0.0 <= float(radius) <= 1.0:
        raise ValueError(f"radius must be in [0, 1], got {radius!r}")
    layers = [m for m in model.modules() if isinstance(m, _Sparse)]
    for m in layers:
        m.radius.fill_(float(radius))
    return len(layers)
