"""The trained-model file ``<out>/model.pt``: a plain state dict plus what rebuilding needs.

The file holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it
and loading never runs code::

    {"format": 2, "state_dict": {...}, "norm": "sn(candidates=in+ln+bn, momentum=0.1)",
     "width": 1.0, "blocks": 5, "pixel_scale": 255.0, "styles": ["starry"],
     "config": {"train.lr": 0.001, ...}}

``norm`` is the text of the network's :class:`snexp.NormSpec`. Format 1 files (written before
the spec carried its options) hold the kind in ``norm`` and the options in a ``norm_options``
table; they load into the same spec. Files written before ``pixel_scale`` was recorded hold 0-1
networks and load with scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from snexp import NormSpec
from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint
from snexp.runtime.config import ConfigError, flatten
from stylize.net import MAX_BLOCKS, MAX_WIDTH, TransformerNet

__all__ = ["MODEL_FORMAT", "load_model", "save_model"]

MODEL_FORMAT = 2  # bump when the layout of model.pt changes
# the keys of each format this version reads
_KEYS = {1: ("state_dict", "norm", "norm_options", "width", "blocks", "styles"),
         2: ("state_dict", "norm", "width", "blocks", "styles")}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, NormSpec) else value  # the config's model.norm


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
    if net.norm is None:
        raise ValueError("save_model needs a network built from a norm spec "
                         "(TransformerNet(NormSpec or its text)), not from a callable")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else _plain(v)
             for k, v in net.state_dict().items()}
    return save_checkpoint({
        "format": MODEL_FORMAT,
        "state_dict": state,
        "norm": str(net.norm),
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
        ("norm", isinstance(obj["norm"], str), "a norm spec such as 'sn'"),
        ("width", isinstance(obj["width"], number) and not isinstance(obj["width"], bool)
         and 0 < obj["width"] <= MAX_WIDTH, f"a number in (0, {MAX_WIDTH}]"),
        ("blocks", type(obj["blocks"]) is int and 0 <= obj["blocks"] <= MAX_BLOCKS,
         f"an integer in [0, {MAX_BLOCKS}]"),
        ("styles", isinstance(obj["styles"], list) and obj["styles"]
         and all(isinstance(n, str) for n in obj["styles"]), "a non-empty list of names"),
        ("norm_options", isinstance(obj.get("norm_options", {}), Mapping),
         "a table of options"),
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
        ``(net, meta)``: the network and the file's metadata (everything but the weights;
        ``meta["norm"]`` is the spec's text for either format).

    Raises:
        ConfigError: The file is missing, unreadable, or not a stylize model.
    """
    obj = load_checkpoint(path, map_location=map_location)
    fmt = obj.get("format")
    keys = _KEYS.get(fmt) if type(fmt) is int else None  # an edited file may hold anything
    if keys is None or any(k not in obj for k in keys):
        hint = " (a training checkpoint? use <out>/model.pt)" if "objects" in obj else ""
        raise ConfigError(f"'{path}' is not a stylize model file of format "
                          f"{' or '.join(map(str, _KEYS))}{hint}")
    problem = _bad_field(obj)
    try:
        if problem is not None:
            raise ValueError(problem)
        if obj["format"] == 1:  # the kind, and its options as a table
            norm = NormSpec(obj["norm"], obj["norm_options"])
        else:
            norm = NormSpec.parse(obj["norm"])
        net = TransformerNet(norm, width=obj["width"], blocks=obj["blocks"],
                             num_styles=len(obj["styles"]),
                             pixel_scale=float(obj.get("pixel_scale", 1.0)))
        net.load_state_dict(obj["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        # A hand-made or edited file: its fields or weights do not make a network.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"'{path}' is not a usable stylize model ({reason}); pass the "
                          "model.pt that python -m stylize.train wrote") from None
    net.eval()
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "norm_options")}
    return net, {**meta, "norm": str(norm)}  # the spec's text, whatever the format
