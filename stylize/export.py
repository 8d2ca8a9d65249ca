"""Exporting a trained network: a ``torch.export`` program (.pt2) or an ONNX model (.onnx).

Both take an image (1, 3, H, W) in [0, 1] with any height and width (at least 5) and return the
unclamped stylized image; a multi-style network is exported with one style (or blend) fixed.
ONNX export needs the optional extra ``pip install .[export]`` (onnx, onnxscript;
onnxruntime to run the file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from snexp.runtime.config import ConfigError
from snexp.runtime.files import replace_atomic
from stylize.net import TransformerNet, style_weights

__all__ = ["ONNX_EXTRA", "FixedStyle", "export_model", "missing_onnx_packages"]

ONNX_EXTRA = ("onnx", "onnxscript")  # needed to write .onnx files; onnxruntime to run them


class FixedStyle(nn.Module):
    """``net`` with its style (index or weights) baked in: ``forward(x)`` only."""

    def __init__(self, net: TransformerNet, style: int | Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        weights = style_weights(style, net.num_styles)
        self.register_buffer("style", weights if weights is not None else torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.style if self.net.num_styles > 1 else None)


def missing_onnx_packages() -> list[str]:
    """The packages of the ONNX extra that are not installed."""
    return [m for m in ONNX_EXTRA if importlib.util.find_spec(m) is None]


def _dynamic_shapes() -> dict:
    dim = torch.export.Dim.AUTO
    return {"x": {2: dim, 3: dim}}


def export_model(net: TransformerNet, path: str | Path, style: int | Tensor | None = None,
                 *, example_size: int = 64) -> Path:
    """Write ``net`` as ``.pt2`` (torch.export) or ``.onnx``, with dynamic height and width.

    Args:
        net: The trained network (exported in eval mode, on CPU).
        path: Output file; its suffix picks the format.
        style: Style index or weights for a multi-style network.
        example_size: Side of the example input used for tracing.

    Raises:
        ConfigError: Unknown suffix, or ONNX without its optional packages.
    """
    path = Path(path)
    model = FixedStyle(net.cpu().eval(), style).eval()
    example = (torch.rand(1, 3, example_size, example_size),)
    if path.suffix == ".pt2":
        program = torch.export.export(model, example, dynamic_shapes=_dynamic_shapes())
        # atomically, as every model file: no half-written .pt2, no write through a link
        replace_atomic(path, lambda f: torch.export.save(program, f), binary=True)
        return path
    if path.suffix == ".onnx":
        missing = missing_onnx_packages()
        if missing:
            raise ConfigError(
                f"ONNX export needs the optional packages {', '.join(missing)}: install them "
                "with pip install 'snexp[export]' (or pip install onnx onnxscript onnxruntime)"
                "; --export model.pt2 (torch.export) works without them")
        program = torch.export.export(model, example, dynamic_shapes=_dynamic_shapes())
        # SN's op has no ONNX function: inline its ATen equations (torch.export keeps the op)
        program = program.run_decompositions(decompose_custom_triton_ops=True)
        torch.onnx.export(program, example, str(path), dynamo=True, input_names=["x"],
                          output_names=["y"])
        return path
    raise ConfigError(f"--export {path}: the suffix must be .onnx or .pt2")
