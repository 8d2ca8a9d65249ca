"""The child network of the micro space: weight-sharing during search, fixed for retraining.

ENAS (Pham et al. 2018, Sec. 2.3; official ``micro_child.py`` ``_model``): a 3x3 stem with
``3 * filters`` channels, then ``layers + 2`` cells in three stages with a reduction (channels
doubled) at the two positions of :func:`reduction_layers`, ReLU, global pooling, dropout and a
bias-free linear classifier. The cells are :mod:`nas.cells`:

- fixed (``arch=Architecture``): :class:`~nas.cells.FixedCell` s; a reduction cell runs its
  input slots with stride 2; each cell outputs all its loose ends (``k * C`` channels); drop
  path and the auxiliary head (after the cell that follows the second reduction) for training;
- shared (``arch=None``): :class:`~nas.cells.SearchCell` s; as in the official ``_enas_layer``
  path a reduction position first factorized-reduces the previous output (which then becomes
  input 1, the previous output input 0) and runs the reduction architecture at stride 1.

Every normalizer comes from one ``norm_layer(channels)`` callable (torchvision's convention), which
the caller resolves once from its norm spec (``cfg.child.norm.layer()``, :class:`snexp.NormSpec`)
and the network hands to every cell and op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import snexp
from nas.cells import FixedCell, SearchCell
from nas.ops import FactorizedReduce
from nas.space import PRIMITIVES, Architecture

__all__ = ["ChildNet", "ChildOutput", "reduction_layers"]

NormLayer = Callable[[int], nn.Module]


class ChildOutput(NamedTuple):
    """Class logits ``(N, K)`` and, when the auxiliary head ran, its logits (else ``None``)."""

    logits: torch.Tensor
    aux: torch.Tensor | None


def reduction_layers(layers: int) -> tuple[int, int]:
    """Positions of the two reduction cells among ``layers + 2`` cells (ENAS's pool layers)."""
    distance = layers // 3
    return distance, 2 * distance + 1


class _AuxHead(nn.Module):
    """ENAS's auxiliary classifier: ReLU, avg-pool 5 stride 3, 1x1 conv 128, norm, ReLU, a conv
    over the whole remaining ``size x size`` map to 768 ("SAME" padded), norm, ReLU, global
    pooling, bias-free linear.

    Args:
        c: Input channels.
        size: Side of the input feature map (8 for 32x32 images: the pooled map is 2x2).
        num_classes: Output classes.
        norm_layer: ``norm_layer(channels) -> nn.Module``.
    """

    def __init__(self, c: int, size: int, num_classes: int, norm_layer: NormLayer) -> None:
        super().__init__()
        # NOTE: feature maps smaller than 5x5 (images under 20 px) pool with a smaller window.
        window = min(5, size)
        self.pool = nn.AvgPool2d(window, 3)
        side = (size - window) // 3 + 1
        self.pad = (side - 1) // 2, side - 1 - (side - 1) // 2  # TF "SAME": the rest after
        self.proj = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(c, 128, 1, bias=False),
                                  norm_layer(128), nn.ReLU(inplace=False))
        self.conv = nn.Conv2d(128, 768, side, bias=False)
        self.norm = norm_layer(768)
        self.classifier = nn.Linear(768, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.pool(torch.relu(x)))  # (N, 128, side, side)
        before, after = self.pad
        x = self.conv(nn.functional.pad(x, (before, after, before, after)))
        x = torch.relu(self.norm(x)).mean((2, 3))  # (N, 768)
        return self.classifier(x)


class ChildNet(nn.Module):
    """Stem, ``layers + 2`` cells (two of them reduction cells), pooling and a classifier.

    Args:
        num_classes: Output classes.
        arch: ``None``: the weight-sharing search network; else the fixed network of ``arch``.
        norm_layer: ``norm_layer(channels) -> nn.Module`` for every norm, e.g.
            ``NormSpec.parse("sn(prior=bn:4)").layer()``; ``None``: SN with its defaults.
        layers: Normal cells (ENAS search 6, final 15); two reduction cells are added.
        filters: Channels of the first stage (doubled at each reduction); stem has 3x.
        num_nodes: Computed nodes per cell (``B``; a fixed ``arch`` sets it).
        aux: Build ENAS's auxiliary head (its logits come in training mode with gradients).
        dropout: Dropout before the classifier (ENAS: 1 - keep_prob, 0.1 search, 0.2 final).
        in_channels: Image channels.
        image_size: Image side; sizes the auxiliary head's last conv (2x2 at 32 px).
        primitives: Op names of the shared cells.

    Example:
        >>> net = ChildNet(10, layers=2, filters=8, norm_layer=snexp.norm_layer("bn"))
        >>> net(torch.randn(2, 3, 32, 32), arch).logits.shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        arch: Architecture | None = None,
        *,
        norm_layer: NormLayer | None = None,
        layers: int = 6,
        filters: int = 20,
        num_nodes: int = 5,
        aux: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
        image_size: int = 32,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        if arch is not None:
            num_nodes, primitives = arch.num_nodes, arch.primitives
        if norm_layer is None:
            norm_layer = snexp.norm_layer("sn")
        self.arch, self.num_nodes, self.drop_keep = arch, num_nodes, 1.0
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 3 * filters, 3, padding=1, bias=False),
            norm_layer(3 * filters),
        )
        pools = reduction_layers(layers)
        c_pp = c_p = 3 * filters
        c, size, reduction_prev = filters, image_size, False
        self.cells = nn.ModuleList()
        self.reduce = nn.ModuleDict()  # search network: factorized reduction before the cell
        self.aux_after = pools[1] + 1 if aux else None  # ENAS: aux_head_indices
        self.aux_head: _AuxHead | None = None
        for index in range(layers + 2):
            reduction = index in pools
            if reduction:
                c, size = 2 * c, math.ceil(size / 2)
            if arch is not None:
                cell: nn.Module = FixedCell(
                    c_pp, c_p, c, arch.cell(reduction), primitives, reduction=reduction,
                    reduction_prev=reduction_prev, norm_layer=norm_layer)
                c_out = cell.out_channels
            else:
                if reduction:
                    self.reduce[str(index)] = FactorizedReduce(c_p, c, norm_layer)
                    c_pp, c_p, reduction_prev = c_p, c, True
                cell = SearchCell(c_pp, c_p, c, num_nodes, primitives,
                                  reduction_prev=reduction_prev, norm_layer=norm_layer)
                c_out = c
            self.cells.append(cell)
            c_pp, c_p, reduction_prev = c_p, c_out, reduction and arch is not None
            if index == self.aux_after:
                self.aux_head = _AuxHead(c_out, size, num_classes, norm_layer)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_p, num_classes, bias=False)  # ENAS: fc without bias

    def aux_params(self) -> int:
        """Parameters of the auxiliary head (0 without one)."""
        return sum(p.numel() for p in self.aux_head.parameters()) if self.aux_head else 0

    def params(self) -> int:
        """Parameters used at test time: all but the auxiliary head's (ENAS's count)."""
        return sum(p.numel() for p in self.parameters()) - self.aux_params()

    def forward(self, x: torch.Tensor, arch: Architecture | None = None) -> ChildOutput:
        """Logits of ``x`` ``(N, C, H, W)``; ``arch`` is required for the search network."""
        if self.arch is None and arch is None:
            raise ValueError("the weight-sharing ChildNet needs forward(x, arch)")
        s0 = s1 = self.stem(x)
        aux = None
        count = len(self.cells)
        for index, cell in enumerate(self.cells):
            if self.arch is not None:
                # ENAS drop path: deeper cells drop more (keep 1 - (l+1)/L * (1 - keep)).
                keep = 1.0 - (index + 1) / count * (1.0 - self.drop_keep)
                s0, s1 = s1, cell(s0, s1, keep)
            else:
                assert arch is not None
                reduction = str(index) in self.reduce
                if reduction:
                    s0, s1 = s1, self.reduce[str(index)](s1)
                s0, s1 = s1, cell(s0, s1, arch.cell(reduction), arch.primitives)
            if (index == self.aux_after and self.aux_head is not None and self.training
                    and torch.is_grad_enabled()):  # only where a loss can use it
                aux = self.aux_head(s1)
        pooled = torch.relu(s1).mean((2, 3))  # (N, C)
        return ChildOutput(self.classifier(self.dropout(pooled)), aux)
