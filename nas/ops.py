"""Candidate operations of the ENAS micro space and the small blocks around them.

One ``OPS`` table of ``lambda C, stride, norm_layer: module`` (DARTS ``operations.py``) with
torchvision's ``norm_layer`` convention instead of a hard-coded BatchNorm: every normalizer in
every op, in the cell preprocessing and in the factorized reduce is ``norm_layer(channels)``, a
callable resolved once from ``snexp.norm_layer(kind, ...)`` at the top of the network.

Ops follow ENAS (Pham et al. 2018, Sec. 2.3 and the official ``micro_child.py``): separable
convolutions are ReLU -> depthwise -> pointwise -> norm, applied twice; pooling is 3x3 with
padding 1; the identity with stride 2 is a factorized reduction (two offset 1x1 convolutions
with stride 2, concatenated).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas.space import PRIMITIVES

__all__ = ["OPS", "FactorizedReduce", "ReLUConvNorm", "SepConv", "drop_path"]

NormLayer = Callable[[int], nn.Module]


class ReLUConvNorm(nn.Sequential):
    """ReLU -> conv (no bias) -> norm; ENAS's cell-input calibration (1x1) and stem blocks."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, norm_layer: NormLayer
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            norm_layer(c_out),
        )


class SepConv(nn.Sequential):
    """(ReLU -> depthwise kxk -> pointwise 1x1 -> norm) twice; the stride is in the first.

    Args:
        c: Channels in and out.
        kernel: 3 or 5.
        stride: 1, or 2 in a reduction cell.
        norm_layer: ``norm_layer(channels) -> nn.Module``.
    """

    def __init__(self, c: int, kernel: int, stride: int, norm_layer: NormLayer) -> None:
        layers: list[nn.Module] = []
        for s in (stride, 1):
            layers += [
                nn.ReLU(inplace=False),
                nn.Conv2d(c, c, kernel, s, padding=kernel // 2, groups=c, bias=False),
                nn.Conv2d(c, c, 1, bias=False),
                norm_layer(c),
            ]
        super().__init__(*layers)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two offset 1x1 stride-2 convs, concatenated.

    ENAS's ``_factorized_reduction``: no ReLU of its own; the official code puts one in front
    only where it calibrates a cell input (``relu=True`` here), not in the stride-2 identity op,
    the reduction of loose ends or the search network's reduction step.

    Args:
        c_in: Input channels.
        c_out: Output channels (split as evenly as possible between the two paths).
        norm_layer: ``norm_layer(channels) -> nn.Module``.
        relu: Apply a ReLU first.
    """

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer, *,
                 relu: bool = False) -> None:
        super().__init__()
        half = c_out // 2
        self.relu = nn.ReLU(inplace=False) if relu else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, half, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - half, 1, stride=2, bias=False)
        self.norm = norm_layer(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # (N, C, H, W), offset 1 px
        return self.norm(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def _identity(c: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, norm_layer)


OPS: dict[str, Callable[[int, int, NormLayer], nn.Module]] = {
    "sep_conv_3x3": lambda c, stride, norm_layer: SepConv(c, 3, stride, norm_layer),
    "sep_conv_5x5": lambda c, stride, norm_layer: SepConv(c, 5, stride, norm_layer),
    "avg_pool_3x3": lambda c, stride, norm_layer: nn.AvgPool2d(
        3, stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda c, stride, norm_layer: nn.MaxPool2d(3, stride, padding=1),
    "identity": _identity,
}
assert set(PRIMITIVES) <= set(OPS), "every primitive needs an entry in OPS"


def drop_path(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``1 - keep_prob``, rescaling the rest.

    Returns a new tensor; ``keep_prob >= 1`` returns ``x`` unchanged.
    """
    if keep_prob >= 1.0:
        return x
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    return x * mask.bernoulli_(keep_prob) / keep_prob
