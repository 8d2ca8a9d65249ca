"""Loading checkpoints saved by the authors' released SN code into snexp models.

The authors' layers store ``weight``/``bias`` as (1, C, 1, 1), running statistics as (1, C, 1),
and the importance logits ``mean_weight``/``var_weight`` in the order [IN, LN, BN] ([LN, BN] in
their 1d layer, [IN, LN] without BN); their ResNets name norms ``sn1``, ``sn2``, ``sn3`` where
torchvision's use ``bn1``, ``bn2``, ``bn3``, in the same module order. Build the model with
``compat="official"`` to reproduce their numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from snexp.norm.switchable import SwitchNorm1d, _SwitchNorm

__all__ = ["load_official_state_dict"]

_SN_NAME = re.compile(r"(^|\.)sn(\d+)\.")


def _official_order(k: int, is_1d: bool) -> tuple[str, ...]:
    if k == 3:
        return ("in", "ln", "bn")
    if k == 2:
        return ("ln", "bn") if is_1d else ("in", "ln")
    raise ValueError(f"an official SN layer has 2 or 3 importance logits, got {k}")


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]
                             ) -> nn.Module:
    """Load an authors'-code checkpoint into a model built with snexp SN layers.

    Args:
        model: e.g. ``convert_norm(torchvision.models.resnet50(), "sn", compat="official")``.
        state_dict: their state dict, or a checkpoint dict holding it under "state_dict";
            a DataParallel "module." prefix is removed.

    Returns:
        The model, loaded (strictly: every key must find its place).

    Example:
        >>> net = convert_norm(torchvision.models.resnet50(), "sn", compat="official")
        >>> ckpt = torch.load("resnet50_sn.pth", map_location="cpu", weights_only=True)
        >>> load_official_state_dict(net, ckpt)
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    own = model.state_dict()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _SwitchNorm)}
    out: dict[str, object] = {}
    unexpected = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        target = key if key in own else _SN_NAME.sub(r"\1bn\2.", key)
        if target not in own:
            unexpected.append(key)
            continue
        layer_name, _, attr = target.rpartition(".")
        layer = layers.get(layer_name)
        if layer is not None and attr in ("mean_weight", "var_weight"):
            theirs = _official_order(value.numel(), isinstance(layer, SwitchNorm1d))
            if set(theirs) != set(layer.candidates):
                raise ValueError(f"{layer_name}: the checkpoint mixes {theirs}, the layer "
                                 f"{layer.candidates}; build it with candidates={theirs}")
            value = value.flatten()[[theirs.index(c) for c in layer.candidates]]
        if isinstance(value, torch.Tensor) and isinstance(own[target], torch.Tensor):
            if value.numel() != own[target].numel():
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit "
                                 f"{target} of shape {tuple(own[target].shape)}")
            value = value.reshape(own[target].shape)
        out[target] = value
    missing = [k for k in own if k not in out and not k.endswith(
        ("num_batches_tracked", "_extra_state", "radius", "mean_fixed", "var_fixed"))]
    if unexpected or missing:
        raise ValueError(f"checkpoint does not match the model: unexpected keys "
                         f"{unexpected[:8]}, missing keys {missing[:8]}")
    for k in own:
        out.setdefault(k, own[k])
    model.load_state_dict(out)
    return model
