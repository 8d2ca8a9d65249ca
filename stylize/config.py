"""The configs of ``stylize``: model, data, losses, training and logging, plus the runtime.

Defaults are those of the PyTorch reference of Johnson et al. (pytorch/examples
``fast_neural_style``): content weight 1e5, style weight 1e10, Adam lr 1e-3, batch 4, 2 epochs,
256 px crops. Presets in ``configs/stylize/`` override what differs (``quick``, ``johnson``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from snexp import NormSpec
from snexp.runtime.config import RuntimeConfig
from stylize.cond import style_norm_layer
from stylize.net import MAX_BLOCKS, MAX_WIDTH

__all__ = ["DEFAULT_NORM", "DataConfig", "LogConfig", "LossConfig", "ModelConfig", "PRESETS",
           "StylizeConfig", "TrainConfig", "check_norm"]

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "stylize"

# SN as in the SN paper, its options spelled out so that config.toml records them; momentum in
# the PyTorch convention (the SN authors' 0.9 is our 0.1)
DEFAULT_NORM = NormSpec("sn", candidates=("in", "ln", "bn"), momentum=0.1)


def _widths(width: float) -> list[int]:
    return [max(1, round(width * c)) for c in (32, 64, 128)]


def check_norm(norm: NormSpec | str, width: float, num_styles: int = 1) -> None:
    """Build ``norm``'s layer at every width of the network, so that a mistake is refused before
    any work (the layers check their own options; GN's groups get a message naming the fix).

    Raises:
        ValueError: The spec does not make a layer at some width.
    """
    norm, widths = NormSpec.parse(norm), _widths(width)
    groups = dict(norm.options).get("groups", 32)
    if norm.kind == "gn" and isinstance(groups, int) and groups > 0 and any(
            w % groups for w in widths):
        raise ValueError(f"gn groups={groups} must divide the widths {widths}; set "
                         f"model.norm=gn(groups=G) with G dividing them, or model.width")
    layer = style_norm_layer(norm, num_styles)
    for w in widths:
        try:
            layer(w)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"norm {norm}: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """The transformation network (stylize.net.TransformerNet)."""

    norm: NormSpec = DEFAULT_NORM  # normalizer of every layer with its options, e.g. gn(groups=8)
    width: float = 1.0  # channel multiplier of the 32/64/128 widths
    blocks: int = 5  # residual blocks at the lowest resolution
    pixel_scale: float = 255.0  # the network computes on pixels x this: 255 as the reference

    # Keys of config.toml files written before `norm` carried its options (run folders that
    # --resume reads); `--set model.momentum=...` is folded in the same way.
    LEGACY_KEYS: ClassVar[dict[str, Any]] = {
        "candidates": tuple[str, ...], "momentum": float, "groups": int}

    @classmethod
    def upgrade_legacy(cls, fields: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
        """Fold old keys into ``norm`` as the old translator passed them to the layers:
        candidates and momentum for sn/ssn, momentum for bn, groups for gn, none otherwise."""
        norm: NormSpec = fields["norm"]
        used = {"sn": ("candidates", "momentum"), "ssn": ("candidates", "momentum"),
                "bn": ("momentum",), "gn": ("groups",)}.get(norm.kind, ())
        options = {**dict(norm.options), **{k: v for k, v in old.items() if k in used}}
        return {"norm": NormSpec(norm.kind, options)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", NormSpec.parse(self.norm))  # ModelConfig(norm="in")
        if not 0 < self.pixel_scale < float("inf"):
            raise ValueError(f"pixel_scale must be positive and finite, got {self.pixel_scale}")
        if not 0 < self.width <= MAX_WIDTH:
            raise ValueError(f"width must be in (0, {MAX_WIDTH}], got {self.width}")
        if not 0 <= self.blocks <= MAX_BLOCKS:
            raise ValueError(f"blocks must be in [0, {MAX_BLOCKS}], got {self.blocks}")
        check_norm(self.norm, self.width)


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

    def __post_init__(self) -> None:
        if len(self.data.styles) > 1:  # the style-conditional layers, with their own options
            check_norm(self.model.norm, self.model.width, len(self.data.styles))

