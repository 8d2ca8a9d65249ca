"""The feed-forward image transformation network of Johnson et al. (2016), with any normalizer.

Johnson, Alahi and Fei-Fei, "Perceptual Losses for Real-Time Style Transfer and
Super-Resolution" (ECCV 2016), supplementary Table 1, as in the PyTorch reference
(pytorch/examples ``fast_neural_style``): reflection-padded 9x9 conv (3->32), two stride-2 3x3
convs (->64, ->128), five residual blocks at 128 channels, two nearest-neighbour x2 upsampling
steps each followed by a 3x3 conv (Odena et al., "Deconvolution and Checkerboard Artifacts",
instead of transposed convs), and a final 9x9 conv to RGB. Every norm comes from one
``norm_layer``, an ``snexp.NormSpec`` resolved once (SN by default, as in the SN paper's
style-transfer experiment); with several styles they are style-conditional (``stylize.cond``).

Pixel range: callers pass and get images in [0, 1], but by default the network computes on
0-255 pixels, as the reference does: ``forward(x) = body(255 x) / 255``. This is the reference's
function of its weights (same initialization scale relative to the pixels, same training
dynamics: the first outputs are near 0 rather than grey noise that overshoots to white);
``pixel_scale=1`` is the 0-1 parametrization of earlier versions, kept for their model files.
# NOTE: the output is not squashed (as in the reference) and is clamped only for display and
# saving.
# NOTE: input sizes that are not multiples of 4 work: each upsampled map is cropped to the
# size of the encoder map it mirrors, so the output always has the input's height and width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snexp import NormSpec
from stylize.cond import StyleNorm, style_norm_layer

__all__ = ["MAX_BLOCKS", "MAX_WIDTH", "MIN_SIZE", "TransformerNet", "style_weights"]

MIN_SIZE = 5  # smallest height/width: reflection padding needs 2 pixels at 1/4 resolution
# The largest network a model.pt may describe (stylize.saved refuses more, so that an edited
# file cannot make apply allocate without bound); training refuses the same, so every model it
# writes can be applied.
MAX_WIDTH, MAX_BLOCKS = 64, 256


def _norm(norm: nn.Module, x: Tensor, style: Tensor | None) -> Tensor:
    return norm(x, style) if isinstance(norm, StyleNorm) else norm(x)


class _ConvBlock(nn.Module):
    """[nearest x2 upsample, crop] -> reflection pad -> conv -> optional norm -> optional ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, *,
                 norm_layer: Callable[[int], nn.Module] | None, relu: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride)
        self.norm = norm_layer(c_out) if norm_layer is not None else None
        self.relu = relu

    def forward(self, x: Tensor, style: Tensor | None = None,
                size: tuple[int, int] | None = None) -> Tensor:
        if self.upsample:
            # Nearest to (2h or 2h-1, 2w or 2w-1) is exactly "repeat x2, crop the last row or
            # column"; asking for the size keeps torch.export free of shape guards.
            if size is None:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, 2h, 2w)
            else:
                x = F.interpolate(x, size=size, mode="nearest")  # (N, C, *size)
        x = self.conv(self.pad(x))
        if self.norm is not None:
            x = _norm(self.norm, x, style)
        return F.relu(x) if self.relu else x


class _ResidualBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus identity (He et al. 2016; Gross and Wilber's variant)."""

    def __init__(self, channels: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.block1 = _ConvBlock(channels, channels, 3, norm_layer=norm_layer)
        self.block2 = _ConvBlock(channels, channels, 3, norm_layer=norm_layer, relu=False)

    def forward(self, x: Tensor, style: Tensor | None = None) -> Tensor:
        return x + self.block2(self.block1(x, style), style)


def style_weights(style: int | Tensor | None, num_styles: int, *,
                  device: torch.device | None = None) -> Tensor | None:
    """Style weights (S,) from a style index, a weight vector, or ``None`` (style 0).

    Returns ``None`` for a single-style network (its norms take no style).
    """
    if num_styles == 1:
        if isinstance(style, int) and style != 0:
            raise ValueError(f"style index {style} out of range: the network has 1 style")
        return None
    if style is None:
        style = 0
    if isinstance(style, int):
        if not 0 <= style < num_styles:
            raise ValueError(f"style index {style} out of range 0..{num_styles - 1}")
        return F.one_hot(torch.tensor(style, device=device), num_styles).float()
    if style.shape != (num_styles,):
        raise ValueError(f"style weights must have shape ({num_styles},), got "
                         f"{tuple(style.shape)}")
    return style


class TransformerNet(nn.Module):
    """Johnson et al.'s style-transfer network with a chosen normalizer.

    Args:
        norm_layer: Every norm of the network: a :class:`snexp.NormSpec` or its text (``"sn"``,
            ``"sn(candidates=in+ln)"``, ``"gn(groups=8)"``), resolved once with
            :func:`stylize.cond.style_norm_layer` and kept as ``self.norm`` (what
            ``stylize.saved`` writes); or a callable ``norm_layer(channels)`` that already
            builds style-conditional norms when ``num_styles > 1`` (``self.norm`` is then None).
        width: Channel multiplier: the widths are ``round(width * (32, 64, 128))``.
        blocks: Number of residual blocks (5 in the paper).
        num_styles: Styles learned at once; above 1 every norm is style-conditional.
        pixel_scale: The body computes on ``pixel_scale * x`` and its output is divided by it:
            255 (default) is the reference's 0-255 parametrization, 1 the 0-1 one.

    Example:
        >>> net = TransformerNet("sn", width=0.25)
        >>> net(torch.rand(2, 3, 37, 50)).shape
        torch.Size([2, 3, 37, 50])
    """

    def __init__(self, norm_layer: NormSpec | str | Callable[[int], nn.Module] = "sn", *,
                 width: float = 1.0, blocks: int = 5, num_styles: int = 1,
                 pixel_scale: float = 255.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if not pixel_scale > 0 or pixel_scale == float("inf"):
            raise ValueError(f"pixel_scale must be positive and finite, got {pixel_scale}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.width, self.blocks, self.num_styles = width, blocks, num_styles
        self.pixel_scale = float(pixel_scale)
        if callable(norm_layer):
            self.norm, layer = None, norm_layer
        else:
            self.norm = NormSpec.parse(norm_layer)
            layer = style_norm_layer(self.norm, num_styles)
        c1, c2, c3 = (max(1, round(width * c)) for c in (32, 64, 128))
        self.conv1 = _ConvBlock(3, c1, 9, norm_layer=layer)
        self.down1 = _ConvBlock(c1, c2, 3, 2, norm_layer=layer)
        self.down2 = _ConvBlock(c2, c3, 3, 2, norm_layer=layer)
        self.res = nn.ModuleList(_ResidualBlock(c3, layer) for _ in range(blocks))
        self.up1 = _ConvBlock(c3, c2, 3, norm_layer=layer, upsample=True)
        self.up2 = _ConvBlock(c2, c1, 3, norm_layer=layer, upsample=True)
        self.conv_out = _ConvBlock(c1, 3, 9, norm_layer=None, relu=False)

    @property
    def reach(self) -> int:
        """How far (pixels) an input pixel can influence the output: the receptive field's radius.

        The sum of ``kernel // 2`` times the layer's stride relative to the input: 4 (9x9), 1
        and 2 (the stride-2 3x3 convs), 4 per residual conv at 1/4 resolution, 2 and 1 (the
        upsampling 3x3 convs), 4 (9x9); plus 4 for the alignment of the 1/2 and 1/4 grids
        (nearest upsampling and stride 2). 58 px at 5 blocks (57 measured from gradients).
        """
        return 4 + 1 + 2 + 8 * self.blocks + 2 + 1 + 4 + 4

    def forward(self, x: Tensor, style: int | Tensor | None = None) -> Tensor:
        """Stylize ``x`` (N, 3, H, W) in [0, 1]; ``style``: an index or weights (S,)."""
        if x.shape[-2] < MIN_SIZE or x.shape[-1] < MIN_SIZE:
            raise ValueError(f"TransformerNet needs images of at least {MIN_SIZE}x{MIN_SIZE} "
                             f"pixels, got {tuple(x.shape[-2:])}")
        s = style_weights(style, self.num_styles, device=x.device)
        if self.pixel_scale != 1.0:
            x = x * self.pixel_scale  # the reference's 0-255 pixels
        y1 = self.conv1(x, s)  # (N, c1, H, W)
        y2 = self.down1(y1, s)  # (N, c2, ceil(H/2), ceil(W/2))
        y = self.down2(y2, s)  # (N, c3, ceil(H/4), ceil(W/4))
        for block in self.res:
            y = block(y, s)
        y = self.up1(y, s, size=(y2.shape[-2], y2.shape[-1]))  # (N, c2, ceil(H/2), ceil(W/2))
        y = self.up2(y, s, size=(y1.shape[-2], y1.shape[-1]))  # (N, c1, H, W)
        y = self.conv_out(y)  # (N, 3, H, W)
        return y / self.pixel_scale if self.pixel_scale != 1.0 else y
