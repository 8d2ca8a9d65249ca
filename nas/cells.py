"""The two cells of ENAS's micro space, as the official ``micro_child.py`` builds them.

- :class:`FixedCell` (``_fixed_layer``, retraining): the inputs are calibrated to ``C``
  channels (``_maybe_calibrate_size``: a ReLU-factorized reduction of input 0 when it has
  twice the resolution, else a ReLU-1x1-norm where the channels differ), input 1 then passes
  one more ReLU-1x1-norm (``layer_base``); every slot (two per node) owns its op module, so
  two slots that pick the same op on the same input hold two modules. The output is the
  concatenation of every loose end, unused cell inputs included (``_fixed_combine``; in a
  reduction cell an unused input is factorized-reduced first): ``k * C`` channels, which the
  next cells' calibration convs read.
- :class:`SearchCell` (``_enas_layer``, weight sharing): the same calibration, no
  ``layer_base``; every slot owns one module per (input, op), i.e. ENAS's per-input weight
  rows inside the ``x``/``y`` scopes of each node; the loose ends (inputs included) are
  projected back to ``C`` channels by a 1x1 conv whose rows for each node are chosen per
  architecture (``final_conv``). Its ops all have stride 1: the search network reduces before
  the cell (see :class:`nas.child.ChildNet`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas.ops import OPS, FactorizedReduce, ReLUConvNorm, drop_path
from nas.space import Cell

__all__ = ["FixedCell", "SearchCell", "calibration"]

NormLayer = Callable[[int], nn.Module]


def calibration(c_in: int, c: int, norm_layer: NormLayer, *, reduce: bool) -> nn.Module:
    """ENAS's ``_maybe_calibrate_size`` for one input: ``c_in`` -> ``c`` channels, same size."""
    if reduce:
        return FactorizedReduce(c_in, c, norm_layer, relu=True)
    return ReLUConvNorm(c_in, c, 1, 1, norm_layer) if c_in != c else nn.Identity()


def _loose_ends(cell: Cell) -> list[int]:
    """Nodes (the two inputs included) that no node reads: ENAS concatenates them."""
    used = {n for a, _, b, _ in cell for n in (a, b)}
    return [i for i in range(len(cell) + 2) if i not in used]


class FixedCell(nn.Module):
    """One cell of a fixed architecture (ENAS ``_fixed_layer``).

    Args:
        c_pp: Channels of input 0 (the output two cells back).
        c_p: Channels of input 1 (the previous output).
        c: Channels of every node (``out_filters``).
        cell: The cell's nodes, ``(in_1, op_1, in_2, op_2)`` each.
        primitives: The op names ``cell`` indexes.
        reduction: Stride 2 on the slots that read an input.
        reduction_prev: Input 0 has twice the resolution of input 1.
        norm_layer: ``norm_layer(channels) -> nn.Module``.

    The output has ``out_channels = len(loose ends) * c`` channels.
    """

    def __init__(self, c_pp: int, c_p: int, c: int, cell: Cell, primitives: tuple[str, ...], *,
                 reduction: bool, reduction_prev: bool, norm_layer: NormLayer) -> None:
        super().__init__()
        self.cell, self.reduction = cell, reduction
        self.names = [primitives[op] for node in cell for op in (node[1], node[3])]
        self.calib0 = calibration(c_pp, c, norm_layer, reduce=reduction_prev)
        self.calib1 = calibration(c_p, c, norm_layer, reduce=False)
        self.base = ReLUConvNorm(c, c, 1, 1, norm_layer)
        self.ops = nn.ModuleList()
        for a, op_a, b, op_b in cell:
            for inp, op in ((a, op_a), (b, op_b)):
                stride = 2 if reduction and inp < 2 else 1
                self.ops.append(OPS[primitives[op]](c, stride, norm_layer))
        self.loose = _loose_ends(cell)
        # NOTE (ENAS _fixed_combine): an unused input of a reduction cell is still at the
        # higher resolution; it is factorized-reduced (no ReLU) before the concatenation.
        self.combine = nn.ModuleDict({str(i): FactorizedReduce(c, c, norm_layer)
                                      for i in self.loose if i < 2 and reduction})
        self.out_channels = len(self.loose) * c

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_keep: float = 1.0) -> torch.Tensor:
        """The cell's output ``(N, k * C, H', W')``; ``drop_keep < 1`` applies drop path."""
        states = [self.calib0(s0), self.base(self.calib1(s1))]
        for k, (a, _, b, _) in enumerate(self.cell):
            total = 0
            for slot, inp in ((2 * k, a), (2 * k + 1, b)):
                h = self.ops[slot](states[inp])
                if drop_keep < 1.0 and self.training and self.names[slot] != "identity":
                    h = drop_path(h, drop_keep)  # ENAS drops the conv and pool ops only
                total = total + h
            states.append(total)
        outs = [self.combine[str(i)](states[i]) if str(i) in self.combine else states[i]
                for i in self.loose]
        return torch.cat(outs, dim=1)  # (N, k * C, H', W')


class SearchCell(nn.Module):
    """The weight-sharing cell (ENAS ``_enas_layer``): runs any architecture's cell.

    Args:
        c_pp: Channels of input 0.
        c_p: Channels of input 1.
        c: Channels of every node and of the output.
        num_nodes: ``B``, computed nodes.
        primitives: Op names; every slot holds one module per (input, name).
        reduction_prev: Input 0 has twice the resolution of input 1.
        norm_layer: ``norm_layer(channels) -> nn.Module``.
    """

    def __init__(self, c_pp: int, c_p: int, c: int, num_nodes: int, primitives: tuple[str, ...],
                 *, reduction_prev: bool, norm_layer: NormLayer) -> None:
        super().__init__()
        self.c, self.num_nodes = c, num_nodes
        self.calib0 = calibration(c_pp, c, norm_layer, reduce=reduction_prev)
        self.calib1 = calibration(c_p, c, norm_layer, reduce=False)
        self.ops = nn.ModuleDict()  # "<node>_<slot>_<input>" -> {op name: module}
        for node in range(2, num_nodes + 2):
            for slot in (0, 1):
                for inp in range(node):
                    self.ops[f"{node}_{slot}_{inp}"] = nn.ModuleDict(
                        {name: OPS[name](c, 1, norm_layer) for name in primitives})
        self.proj = nn.Conv2d((num_nodes + 2) * c, c, 1, bias=False)  # ENAS final_conv
        self.norm = norm_layer(c)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, cell: Cell,
                primitives: tuple[str, ...]) -> torch.Tensor:
        """The output ``(N, C, H, W)`` of the architecture cell ``cell``."""
        if len(cell) != self.num_nodes:
            raise ValueError(f"architecture has {len(cell)} nodes, the cell {self.num_nodes}")
        states = [self.calib0(s0), self.calib1(s1)]
        for k, (a, op_a, b, op_b) in enumerate(cell):
            node = k + 2
            states.append(self.ops[f"{node}_0_{a}"][primitives[op_a]](states[a])
                          + self.ops[f"{node}_1_{b}"][primitives[op_b]](states[b]))
        loose = _loose_ends(cell)
        out = torch.cat([states[i] for i in loose], dim=1)  # (N, k * C, H, W)
        columns = torch.cat([torch.arange(i * self.c, (i + 1) * self.c) for i in loose])
        weight = self.proj.weight[:, columns.to(out.device)]  # (C, k * C, 1, 1)
        return self.norm(nn.functional.conv2d(torch.relu(out), weight))
