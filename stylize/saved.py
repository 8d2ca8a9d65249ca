"""The trained-model file ``<out>/model.pt``: a plain state dict plus what rebuilding needs.

The file holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it
and loading never runs code::

    {"format": 1, "state_dict": {...}, "norm": "sn", "norm_options": {"candidates": [...]},
     "width": 1.0, "blocks": 5, "pixel_scale": 255.0, "styles": ["starry"],
     "config": {"train.lr": 0.001, ...}}

Files written before ``pixel_scale`` was recorded hold 0-1 networks and load with scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint
from snexp.runtime.config import ConfigError, flatten
from stylize.config import MAX_BLOCKS, MAX_WIDTH
from stylize.net import TransformerNet

__all__ = ["MODEL_FORMAT", "load_model", "save_model"]

MODEL_FORMAT = 1  # bump when the layout of model.pt changes
_KEYS = ("state_dict", "norm", "norm_options", "width", "blocks", "styles")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def save_model(path: str | Path, net: TransformerNet, *, styles: Sequence[str],
               config: Any = None) -> Path:
    """Write ``net`` (unwrapped, on CPU) and its metadata to ``path`` atomically.

    Args:
        path: Destination, e.g. ``<out>/model.pt``.
        net: The trained network.
        styles: Names of its styles, in style-index order.
        config: The run's config dataclass (stored flattened), or ``None``.
    """
    if len(styles) != net.num_styles:
        raise ValueError(f"{len(styles)} style names for a network of {net.num_styles} styles")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else _plain(v)
             for k, v in net.state_dict().items()}
    return save_checkpoint({
        "format": MODEL_FORMAT,
        "state_dict": state,
        "norm": net.norm,
        "norm_options": _plain(net.norm_options),
        "width": float(net.width),
        "blocks": int(net.blocks),
        "pixel_scale": float(net.pixel_scale),
        "styles": list(styles),
        "config": _plain(flatten(config)) if config is not None else {},
    }, path)


def _bad_field(obj: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a model file, or ``None`` (checked before building)."""
    number = (int, float)
    checks = (
        ("norm", isinstance(obj["norm"], str), "a norm kind such as 'sn'"),
        ("width", isinstance(obj["width"], number) and not isinstance(obj["width"], bool)
         and 0 < obj["width"] <= MAX_WIDTH, f"a number in (0, {MAX_WIDTH}]"),
        ("blocks", type(obj["blocks"]) is int and 0 <= obj["blocks"] <= MAX_BLOCKS,
         f"an integer in [0, {MAX_BLOCKS}]"),
        ("styles", isinstance(obj["styles"], list) and obj["styles"]
         and all(isinstance(n, str) for n in obj["styles"]), "a non-empty list of names"),
        ("norm_options", isinstance(obj["norm_options"], Mapping), "a table of options"),
        ("state_dict", isinstance(obj["state_dict"], Mapping), "a table of tensors"),
        ("pixel_scale", isinstance(obj.get("pixel_scale", 1.0), number), "a number"),
    )
    for key, ok, want in checks:
        if not ok:
            return f"its {key} is {repr(obj.get(key))[:60]}, not {want}"
    return None


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu"
               ) -> tuple[TransformerNet, dict[str, Any]]:
    """Rebuild the network saved by :func:`save_model`, in eval mode.

    Returns:
        ``(net, meta)``: the network and the file's metadata (everything but the weights).

    Raises:
        ConfigError: The file is missing, unreadable, or not a stylize model.
    """
    obj = load_checkpoint(path, map_location=map_location)
    if obj.get("format") != MODEL_FORMAT or any(k not in obj for k in _KEYS):
        hint = " (a training checkpoint? use <out>/model.pt)" if "objects" in obj else ""
        raise ConfigError(f"'{path}' is not a stylize model file of format {MODEL_FORMAT}"
                          f"{hint}")
    problem = _bad_field(obj)
    try:
        if problem is not None:
            raise ValueError(problem)
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in obj["norm_options"].items()}
        net = TransformerNet(obj["norm"], width=obj["width"], blocks=obj["blocks"],
                             num_styles=len(obj["styles"]), norm_options=options,
                             pixel_scale=float(obj.get("pixel_scale", 1.0)))
        net.load_state_dict(obj["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        # A hand-made or edited file: its fields or weights do not make a network.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"'{path}' is not a usable stylize model ({reason}); pass the "
                          "model.pt that python -m stylize.train wrote") from None
    net.eval()
    return net, {k: v for k, v in obj.items() if k != "state_dict"}
