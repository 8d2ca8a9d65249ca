"""The child network of the micro space: weight-sharing during search, fixed for retraining.

ENAS (Pham et al. 2018, Sec. 2.3; official ``micro_child.py``): a stem, then ``layers + 2``
cells in three stages with a reduction cell (stride 2, channels doubled) between stages, global
pooling and a linear classifier. One :class:`Cell` class serves both uses:

- shared (``arch=None``): every edge ``(node, input)`` owns one module per primitive, shared by
  all architectures; a forward pass with a sampled architecture runs only the chosen ops, and
  the output projection uses only the weight columns of the concatenated nodes;
- fixed (``arch=Architecture``): only the chosen ops exist; with drop path and an auxiliary
  head (after the last reduction cell) for retraining.

Every normalizer comes from ``norm_layer(channels)``, resolved once from a kind string with
:func:`snexp.norm_layer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import snexp
from nas.ops import OPS, FactorizedReduce, ReLUConvNorm, drop_path
from nas.space import PRIMITIVES, Architecture

__all__ = ["Cell", "ChildNet", "ChildOutput", "reduction_layers"]

NormLayer = Callable[[int], nn.Module]


class ChildOutput(NamedTuple):
    """Class logits ``(N, K)`` and, when the auxiliary head ran, its logits (else ``None``)."""

    logits: torch.Tensor
    aux: torch.Tensor | None


def reduction_layers(layers: int) -> tuple[int, int]:
    """Positions of the two reduction cells among ``layers + 2`` cells (ENAS's pool layers)."""
    distance = layers // 3
    return distance, 2 * distance + 1


class _Projection(nn.Module):
    """ReLU -> 1x1 conv -> norm over concatenated nodes; shared mode slices the weight."""

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.norm = norm_layer(c_out)

    def forward(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.conv.weight if columns is None else self.conv.weight[:, columns]
        return self.norm(nn.functional.conv2d(torch.relu(x), weight))


class Cell(nn.Module):
    """One cell: two calibrated inputs, ``num_nodes`` computed nodes, projected output.

    Args:
        c_prev_prev: Channels of input node 0 (the cell two back).
        c_prev: Channels of input node 1 (the previous cell).
        c: Channels of every node and of the output.
        reduction: Stride 2 on the ops reading the two inputs.
        reduction_prev: Input 0 has twice the resolution of input 1 (reduce it).
        num_nodes: ``B``, computed nodes.
        norm_layer: ``norm_layer(channels) -> nn.Module``.
        arch: ``None`` for the weight-sharing cell, else the fixed architecture.
        primitives: Op names (shared mode builds one module per name and edge).
    """

    def __init__(
        self,
        c_prev_prev: int,
        c_prev: int,
        c: int,
        *,
        reduction: bool,
        reduction_prev: bool,
        num_nodes: int,
        norm_layer: NormLayer,
        arch: Architecture | None = None,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        self.reduction, self.num_nodes, self.c = reduction, num_nodes, c
        self.fixed = arch.cell(reduction) if arch is not None else None
        self.fixed_primitives = arch.primitives if arch is not None else ()
        if reduction_prev:
            self.pre0: nn.Module = FactorizedReduce(c_prev_prev, c, norm_layer)
        else:
            self.pre0 = ReLUConvNorm(c_prev_prev, c, 1, 1, norm_layer)
        self.pre1 = ReLUConvNorm(c_prev, c, 1, 1, norm_layer)
        self.edges = nn.ModuleDict()
        if arch is None:
            for node in range(2, num_nodes + 2):
                for inp in range(node):
                    stride = 2 if reduction and inp < 2 else 1
                    self.edges[f"{node}_{inp}"] = nn.ModuleDict(
                        {name: OPS[name](c, stride, norm_layer) for name in primitives}
                    )
            self.proj = _Projection(num_nodes * c, c, norm_layer)
        else:
            for node, inp, name in arch.edges(reduction):
                key = f"{node}_{inp}_{name}"
                if key not in self.edges:  # both slots may pick the same op on the same input
                    self.edges[key] = OPS[name](c, 2 if reduction and inp < 2 else 1, norm_layer)
            self.proj = _Projection(len(arch.loose_ends(reduction)) * c, c, norm_layer)

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        arch: Architecture | None = None,
        drop_keep: float = 1.0,
    ) -> torch.Tensor:
        """Run the cell; ``arch`` is required in shared mode and ignored in fixed mode."""
        if self.fixed is None and arch is None:
            raise ValueError("a weight-sharing cell needs the architecture to run")
        if self.fixed is not None:
            arch_cell, prims, fixed = self.fixed, self.fixed_primitives, True
        else:
            assert arch is not None
            arch_cell, prims, fixed = arch.cell(self.reduction), arch.primitives, False
        if len(arch_cell) != self.num_nodes:
            raise ValueError(f"architecture has {len(arch_cell)} nodes, the cell {self.num_nodes}")
        states = [self.pre0(s0), self.pre1(s1)]
        for k, node in enumerate(arch_cell):
            total = 0
            for inp, op in ((node[0], node[1]), (node[2], node[3])):
                if fixed:
                    module = self.edges[f"{k + 2}_{inp}_{prims[op]}"]
                else:
                    module = self.edges[f"{k + 2}_{inp}"][prims[op]]
                h = module(states[inp])
                if drop_keep < 1.0 and self.training and not isinstance(module, nn.Identity):
                    h = drop_path(h, drop_keep)
                total = total + h
            states.append(total)
        used = {n for a, _, b, _ in arch_cell for n in (a, b)}
        loose = [i for i in range(2, self.num_nodes + 2) if i not in used]
        out = torch.cat([states[i] for i in loose], dim=1)  # (N, len(loose) * C, H, W)
        if fixed:
            return self.proj(out)
        columns = torch.cat(
            [torch.arange((i - 2) * self.c, (i - 1) * self.c) for i in loose]
        ).to(out.device)
        return self.proj(out, columns)


class _AuxHead(nn.Module):
    """Auxiliary classifier (ENAS/DARTS): ReLU -> pool to 2x2 -> 1x1 conv 128 -> norm -> linear."""

    def __init__(self, c: int, num_classes: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(c, 128, 1, bias=False),
            norm_layer(128),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(128 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class ChildNet(nn.Module):
    """Stem, ``layers + 2`` cells (two of them reduction cells), pooling and a classifier.

    Args:
        num_classes: Output classes.
        arch: ``None``: the weight-sharing search network; else the fixed network of ``arch``.
        norm: Normalizer kind (``"sn"``, ``"bn"``, ...), a callable ``norm(channels)`` or None.
        layers: Normal cells (ENAS search 6, final 15); two reduction cells are added.
        filters: Channels of the first stage (doubled at each reduction); stem has 3x.
        num_nodes: Computed nodes per cell (``B``).
        aux: Build the auxiliary head (fixed network only; its logits come in training mode).
        dropout: Dropout before the classifier.
        in_channels: Image channels.
        norm_options: Options of every norm, e.g. ``{"groups": 4}`` for ``gn``.
        primitives: Op names of the shared cells.

    Example:
        >>> net = ChildNet(10, layers=2, filters=8)
        >>> net(torch.randn(2, 3, 32, 32), arch).logits.shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        arch: Architecture | None = None,
        *,
        norm: str | NormLayer | None = "sn",
        layers: int = 6,
        filters: int = 20,
        num_nodes: int = 5,
        aux: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
        norm_options: dict | None = None,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        if arch is not None and arch.num_nodes != num_nodes:
            num_nodes = arch.num_nodes
        norm_layer = snexp.norm_layer(norm, **(norm_options or {}))
        self.arch, self.num_nodes, self.drop_keep = arch, num_nodes, 1.0
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 3 * filters, 3, padding=1, bias=False),
            norm_layer(3 * filters),
        )
        pools = reduction_layers(layers)
        c_pp, c_p, c, reduction_prev = 3 * filters, 3 * filters, filters, False
        self.cells = nn.ModuleList()
        self.aux_after: int | None = None
        self.aux_head: nn.Module | None = None
        for index in range(layers + 2):
            reduction = index in pools
            c = 2 * c if reduction else c
            self.cells.append(
                Cell(c_pp, c_p, c, reduction=reduction, reduction_prev=reduction_prev,
                     num_nodes=num_nodes, norm_layer=norm_layer, arch=arch, primitives=primitives)
            )
            c_pp, c_p, reduction_prev = c_p, c, reduction
            if aux and arch is not None and index == pools[1]:
                self.aux_after, self.aux_head = index, _AuxHead(c, num_classes, norm_layer)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor, arch: Architecture | None = None) -> ChildOutput:
        """Logits of ``x`` ``(N, C, H, W)``; ``arch`` is required for the search network."""
        if self.arch is None and arch is None:
            raise ValueError("the weight-sharing ChildNet needs forward(x, arch)")
        s0 = s1 = self.stem(x)
        aux = None
        count = len(self.cells)
        for index, cell in enumerate(self.cells):
            # ENAS drop path: deeper cells drop more (keep 1 - (l+1)/L * (1 - keep)).
            keep = 1.0 - (index + 1) / count * (1.0 - self.drop_keep)
            s0, s1 = s1, cell(s0, s1, arch, keep)
            if index == self.aux_after and self.training and self.aux_head is not None:
                aux = self.aux_head(s1)
        pooled = nn.functional.adaptive_avg_pool2d(torch.relu(s1), 1).flatten(1)  # (N, C)
        return ChildOutput(self.classifier(self.dropout(pooled)), aux)
