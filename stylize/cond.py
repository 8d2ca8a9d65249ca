"""Style-conditional normalization: one set of norm parameters per style, shared convolutions.

Dumoulin et al., "A Learned Representation for Artistic Style" (ICLR 2017), eq. 5: conditional
instance norm keeps one (gamma_s, beta_s) per style s and shares everything else. Here the same
idea wraps any ``snexp`` normalizer, and for Switchable Normalization each style also gets its
own importance logits, so every style can pick its own IN/LN/BN mix.

A style is given as a weight vector ``w`` of shape (S,): one-hot for one style, any convex
combination to blend styles at inference (``gamma = w @ gamma_s``, and for SN the importance
probabilities ``p = w @ softmax(logits_s)``, still a point of the simplex).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from snexp import NormSpec, SwitchNormBase, switch_norm
from snexp import norm_layer as resolve_norm
from snexp.norm.switchable import Prior

__all__ = ["StyleNorm", "ConditionalAffine", "ConditionalSwitchNorm2d", "style_norm_layer"]


class StyleNorm(nn.Module):
    """Base of the style-conditional norms: ``forward(x, style)`` with ``style`` (S,) weights."""

    num_styles: int

    def forward(self, x: Tensor, style: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ConditionalAffine(StyleNorm):
    """A parameter-free normalizer followed by a per-style affine map (conditional IN for IN).

    Args:
        base: The normalizer without affine parameters (e.g. ``InstanceNorm2d(C)``).
        num_features: Channel count C.
        num_styles: Number of styles S.

    # NOTE: a BN base keeps one set of running statistics shared by all styles (Dumoulin et
    # al. used IN, which has none); ConditionalSwitchNorm2d keeps one set per style.
    """

    def __init__(self, base: nn.Module, num_features: int, num_styles: int) -> None:
        super().__init__()
        self.base = base
        self.num_styles = num_styles
        self.weight = nn.Parameter(torch.ones(num_styles, num_features))  # (S, C)
        self.bias = nn.Parameter(torch.zeros(num_styles, num_features))  # (S, C)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        style = style.to(self.weight.dtype)
        gamma = (style @ self.weight).view(1, -1, 1, 1)  # (1, C, 1, 1)
        beta = (style @ self.bias).view(1, -1, 1, 1)
        return self.base(x) * gamma + beta


class ConditionalSwitchNorm2d(SwitchNormBase, StyleNorm):
    """Switchable Normalization with per-style affine parameters and importance logits.

    It stands on the same setup and op as :class:`snexp.SwitchNorm2d`
    (:class:`snexp.SwitchNormBase`, with one set of parameters and buffers per style, and
    :func:`snexp.switch_norm`); this module only chooses the op's arguments from the style
    weights. The BN branch keeps running statistics per style (``running_mean[s]``), because
    each style shifts the activations differently.

    Parameters: ``weight``, ``bias`` (S, C), the importance logits ``mean_logits``,
    ``var_logits`` (S, K); buffers ``running_mean``, ``running_var`` (S, C) and
    ``num_batches_tracked`` (S,) when "bn" is a candidate.

    Args:
        num_features: Channel count C.
        num_styles: Number of styles S.
        eps, momentum, candidates, compat, prior, var_prior: As :class:`snexp.SwitchNorm2d`
            (the priors start every style's logits).

    Example:
        >>> norm = ConditionalSwitchNorm2d(16, num_styles=2)
        >>> norm(torch.randn(4, 16, 8, 8), torch.tensor([1.0, 0.0])).shape
        torch.Size([4, 16, 8, 8])
    """

    # NOTE: named *_logits, not mean_weight/var_weight, so that snexp.inspect does not read
    # these (S, K) tensors as one layer's (K,) logits; they are the keys of saved models too.
    logit_names = ("mean_logits", "var_logits")

    def __init__(
        self,
        num_features: int,
        num_styles: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        candidates: tuple[str, ...] = ("in", "ln", "bn"),
        compat: str = "paper",
        prior: Prior = None,
        var_prior: Prior = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, candidates, copies=(num_styles,),
                         compat=compat, prior=prior, var_prior=var_prior)
        self.num_styles = num_styles

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        style = style.to(self.weight.dtype)
        mean_p, var_p = (style @ p for p in self.importance_weights())  # (S, K) -> (K,) each
        weight, bias = style @ self.weight, style @ self.bias  # (C,) each
        running_mean = running_var = tracked = None
        update = False
        if self.running_mean is not None:
            if self.training:
                index = int(style.argmax())
                if float(style[index]) != 1.0:
                    raise ValueError("ConditionalSwitchNorm2d trains on one style at a time; "
                                     f"got style weights {style.tolist()}")
                running_mean, running_var = self.running_mean[index], self.running_var[index]
                tracked = self.num_batches_tracked[index]
                tracked.add_(1)
                update = True
            else:  # a blend of styles evaluates with the blend of their statistics
                running_mean, running_var = style @ self.running_mean, style @ self.running_var
        return switch_norm(x, weight, bias, mean_p, var_p, running_mean, running_var,
                           candidates=self.candidates, training=self.training, eps=self.eps,
                           momentum=self.momentum,
                           update_running=update, num_batches_tracked=tracked,
                           compat=self.compat)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_styles={self.num_styles}, "
                f"candidates={self.candidates}")


def style_norm_layer(norm: NormSpec | str, num_styles: int) -> Callable[[int], nn.Module]:
    """Resolve a norm spec once into ``layer(channels)``; conditional when ``num_styles > 1``.

    Args:
        norm: A :class:`snexp.NormSpec` (the kind with its options) or its text: ``"sn"``,
            ``"sn(momentum=0.01, candidates=in+ln)"``, ``"gn(groups=8)"``.
        num_styles: Styles of the network; 1 gives the plain ``snexp`` layer.

    Returns:
        A callable taking the channel count.

    Example:
        >>> style_norm_layer("sn(candidates=in+ln)", 2)(16)
        ConditionalSwitchNorm2d(16, num_styles=2, candidates=('in', 'ln'))
    """
    if num_styles < 1:
        raise ValueError(f"num_styles must be >= 1, got {num_styles}")
    spec = NormSpec.parse(norm)
    if num_styles == 1 or spec.kind == "none":
        return spec.layer()
    options = dict(spec.options)
    if spec.kind == "sn":
        return lambda c: ConditionalSwitchNorm2d(c, num_styles, **options)
    base = resolve_norm(spec.kind, affine=False, **options)
    return lambda c: ConditionalAffine(base(c), c, num_styles)
