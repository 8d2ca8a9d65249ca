"""Helpers of the stylize tests: a small loss network, tiny configs, reading TensorBoard."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from snexp.runtime.config import RuntimeConfig
from stylize.config import (
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    StylizeConfig,
    TrainConfig,
)
from stylize.loss import VGGOutputs


class TinyFeatures(nn.Module):
    """A small fixed random conv stack with the loss network's four named outputs."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = [(6, 3, 1), (8, 6, 2), (8, 8, 2), (8, 8, 2)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for o, i, s in shapes)
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> VGGOutputs:
        outs = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            outs.append(x)
        return VGGOutputs(*outs)


def tiny_config(out: Path, styles: list[str], *, steps: int = 6, norm: str = "sn",
                preview_every: int = 3, every: int = 1, **data) -> StylizeConfig:
    """A config small enough for a unit test: width 1/8, 32 px, batch 2."""
    return StylizeConfig(
        model=ModelConfig(norm=norm, width=0.125, blocks=2),
        data=DataConfig(styles=tuple(styles), image_size=data.pop("image_size", 32),
                        style_size=32, synthetic_count=data.pop("synthetic_count", 64),
                        preview_count=2, **data),
        loss=LossConfig(content_weight=1.0, style_weight=100.0),
        train=TrainConfig(epochs=100, steps=steps, batch_size=2, lr=1e-2),
        log=LogConfig(every=every, preview_every=preview_every),
        runtime=RuntimeConfig(out=str(out), device="cpu", deterministic=True),
    )


def read_events(folder: Path):
    """TensorBoard scalars {tag: [values]} and images {tag: [(width, height)]} of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = {t: [(e.width, e.height) for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images
