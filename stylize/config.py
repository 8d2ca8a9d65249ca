"""The configs of ``stylize``: model, data, losses, training and logging, plus the runtime.

Defaults are those of the PyTorch reference of Johnson et al. (pytorch/examples
``fast_neural_style``): content weight 1e5, style weight 1e10, Adam lr 1e-3, batch 4, 2 epochs,
256 px crops. Presets in ``configs/stylize/`` override what differs (``quick``, ``johnson``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from snexp.norm.functional import parse_candidates
from snexp.runtime.config import Range, RuntimeConfig

# The largest network a model.pt may describe (stylize.saved refuses more, so that an edited
# file cannot make apply allocate without bound); training refuses the same, so every model it
# writes can be applied.
MAX_WIDTH, MAX_BLOCKS = 64, 256

__all__ = ["DataConfig", "LogConfig", "LossConfig", "ModelConfig", "PRESETS", "StylizeConfig",
           "TrainConfig", "norm_options"]

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "stylize"

NormKind = Literal["sn", "ssn", "in", "bn", "ln", "gn", "none"]


@dataclass(frozen=True)
class ModelConfig:
    """The transformation network (stylize.net.TransformerNet)."""

    norm: NormKind = "sn"  # normalizer of every layer (SN as in the SN paper)
    width: float = 1.0  # channel multiplier of the 32/64/128 widths
    blocks: int = 5  # residual blocks at the lowest resolution
    candidates: tuple[str, ...] = ("in", "ln", "bn")  # SN/SSN candidate statistics
    # running-average factor of SN/SSN/BN, PyTorch convention (the SN authors' 0.9 is our 0.1)
    momentum: Annotated[float, Range(ge=0, le=1)] = 0.1
    groups: int = 32  # groups of gn (must divide every width)
    pixel_scale: float = 255.0  # the network computes on pixels x this: 255 as the reference

    def __post_init__(self) -> None:
        if not 0 < self.pixel_scale < float("inf"):
            raise ValueError(f"pixel_scale must be positive and finite, got {self.pixel_scale}")
        if not 0 < self.width <= MAX_WIDTH:
            raise ValueError(f"width must be in (0, {MAX_WIDTH}], got {self.width}")
        if not 0 <= self.blocks <= MAX_BLOCKS:
            raise ValueError(f"blocks must be in [0, {MAX_BLOCKS}], got {self.blocks}")
        if self.norm in ("sn", "ssn"):
            # the layers' own check, here so that a mistake is refused before any work
            for c in (32, 64, 128):
                parse_candidates(self.candidates, max(1, round(self.width * c)))
        if self.norm == "gn":
            widths = [max(1, round(self.width * c)) for c in (32, 64, 128)]
            if any(w % self.groups for w in widths):
                raise ValueError(f"gn groups={self.groups} must divide the widths {widths}; "
                                 "set model.groups or model.width")


@dataclass(frozen=True)
class DataConfig:
    """Content and style images."""

    styles: tuple[str, ...] = ()  # style image files; several train one conditional network
    content_dir: str | None = None  # folder of photos (recursive); none: embedded scenes
    image_size: int = 256  # side of the square content crops
    style_size: int | None = None  # shorter side of the style images; none: as they are
    synthetic_count: int = 4096  # number of embedded scenes when there is no content_dir
    preview_count: int = 4  # held-out content images shown in the preview grid
    workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.style_size is not None and self.style_size < 16:
            raise ValueError(f"style_size must be >= 16, got {self.style_size}")
        if self.synthetic_count < 1 or self.preview_count < 1 or self.workers < 0:
            raise ValueError("synthetic_count and preview_count must be >= 1, workers >= 0")


@dataclass(frozen=True)
class LossConfig:
    """Perceptual losses (stylize.loss)."""

    content_weight: float = 1e5  # weight of the relu2_2 feature MSE
    style_weight: float = 1e10  # weight of the summed Gram-matrix MSEs
    tv_weight: float = 0.0  # weight of the total-variation term
    vgg_weights: str | None = None  # VGG16 weights file; none: torchvision's cache


@dataclass(frozen=True)
class TrainConfig:
    """Optimization."""

    epochs: int = 2  # passes over the content images
    steps: int | None = None  # stop after this many optimizer steps (none: all epochs)
    batch_size: int = 4  # content images per step (one style per step)
    lr: float = 1e-3  # Adam learning rate
    amp_network: bool = False  # --amp also for the transformation network, not only VGG16

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or none, got {self.steps}")


@dataclass(frozen=True)
class LogConfig:
    """What goes to TensorBoard, how often."""

    every: int = 10  # log the loss scalars every N steps
    preview_every: int = 200  # preview grid and SN importance every N steps (and at the end)


@dataclass(frozen=True)
class StylizeConfig:
    """python -m stylize.train."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def norm_options(model: ModelConfig) -> dict[str, Any]:
    """The keyword options of the model's norm layers (what ``snexp.norm_layer`` takes)."""
    if model.norm in ("sn", "ssn"):
        return {"candidates": tuple(model.candidates), "momentum": model.momentum}
    if model.norm == "bn":
        return {"momentum": model.momentum}
    if model.norm == "gn":
        return {"groups": model.groups}
    return {}
